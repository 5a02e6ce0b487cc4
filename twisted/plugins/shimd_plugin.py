"""
The C{twistd shimd} plugin.  Kept tiny: twistd imports it on every plugin
scan, so it imports nothing of shimd (nor the reactor) until it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from shimd.service import ShimService
    from shimd.tap import Options


@implementer(IServiceMaker, IPlugin)
class _ShimdServiceMaker:
    tapname = "shimd"
    description = "Container shim: runs an OCI runtime and owns the container's IO."

    @property
    def options(self) -> type[Options]:
        from shimd.tap import Options

        return Options

    def makeService(self, options: Options) -> ShimService:
        from shimd.tap import makeService

        return makeService(options)


serviceMaker = _ShimdServiceMaker()
