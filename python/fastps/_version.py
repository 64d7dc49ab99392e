# The single source of the package version (read by scikit-build-core and CMake).
__version__ = "0.1.0"
