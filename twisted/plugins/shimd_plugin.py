"""
The C{twistd shimd} plugin.  Kept tiny: twistd imports it on every plugin
scan, so it imports nothing of shimd (nor the reactor) until it is used.
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _ShimdServiceMaker:
    tapname = "shimd"
    description = "Container shim: runs an OCI runtime and owns the container's IO."

    @property
    def options(self):  # type: ignore[no-untyped-def]
        from shimd.tap import Options

        return Options

    def makeService(self, options):  # type: ignore[no-untyped-def]
        from shimd.tap import makeService

        return makeService(options)


serviceMaker = _ShimdServiceMaker()
