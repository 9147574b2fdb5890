"""Only the package layout lives here (everything else is in pyproject.toml): the top-level analyses/ folder
installs as `hooked_vlm.analyses`, so nothing called `analyses` lands in site-packages, while the repository's
layout keeps showing the architecture (hooked_vlm/ the model, analyses/ the experiments on it)."""
from setuptools import find_packages, setup

packages = find_packages(include=["hooked_vlm", "hooked_vlm.*"])
packages += ["hooked_vlm.analyses" + sub[len("analyses"):] for sub in find_packages(include=["analyses", "analyses.*"])]
setup(packages=packages, package_dir={"hooked_vlm.analyses": "analyses"})
