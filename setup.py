"""Everything is in pyproject.toml except one file setuptools cannot place from there: gemmakit-lm-eval.pth,
which makes `lm_eval --model gemmakit` work on lm-eval 0.4.x (see src/_gemmakit_lm_eval.py). It goes into
site-packages as a data file, also in editable installs."""

import os
import sysconfig

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

SITE = os.path.relpath(sysconfig.get_path("purelib"), sysconfig.get_path("data"))


class EditableWheel(editable_wheel):
    """setuptools skips data files in editable wheels (it asks the distribution for `has_data`, which is named
    `has_data_files`); install them as a regular wheel would."""

    def _run_install(self, category: str) -> None:
        if category == "data" and self.distribution.has_data_files():
            self.run_command("install_data")
        else:
            super()._run_install(category)


setup(data_files=[(SITE, ["src/gemmakit-lm-eval.pth"])], cmdclass={"editable_wheel": EditableWheel})
