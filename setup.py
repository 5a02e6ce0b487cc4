from setuptools import find_packages, setup

# Flat layout with a Twisted plugin in twisted/plugins/shimd_plugin.py.
# There must be no twisted/__init__.py and no twisted/plugins/__init__.py.
# Editable installs need: pip install -e . --config-settings editable_mode=compat
# (the default editable finder hides twisted/plugins from Twisted's plugin scan).
setup(
    name="shimd",
    version="0.1.0",
    description="Container shim on Twisted, a drop-in for iSulad's isulad-shim",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/shimd_plugin.py"]},
    install_requires=[
        "Twisted[tls]>=24.7",
        "zope.interface",
        "pyOpenSSL>=25.3",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14"],
        "bench": ["matplotlib"],
        "lint": ["mypy", "mypy-zope"],
    },
    entry_points={
        "console_scripts": [
            "shimd = shimd.cli:main",
            "isulad-shim = shimd.cli:isuladShimMain",
        ],
    },
    zip_safe=False,
)
