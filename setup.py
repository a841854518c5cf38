from setuptools import find_packages, setup

# Every package under kvmagent/, plus plugins/ installed as kvmagent.plugins (package_dir in
# setup.cfg), so a new subpackage is never left out of a non-editable install.
setup(packages=find_packages(include=["kvmagent", "kvmagent.*"]) + ["kvmagent.plugins"])
