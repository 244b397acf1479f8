from setuptools import find_packages, setup

# twisted.plugins is listed by hand: it is a namespace shared with Twisted
# itself and must not get an __init__.py of ours.
setup(packages=find_packages(include=["ccpd", "ccpd.*"]) + ["twisted.plugins"])
