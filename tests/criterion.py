"""The accuracy criterion: tf_fastattn/criterion.py, loaded by path so the GPU
tests use it where neither TensorFlow nor the installed package is needed."""

import importlib.util as _util
import os as _os

_spec = _util.spec_from_file_location(
    "_tfa_criterion", _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "tf_fastattn",
                                    "criterion.py"))
_module = _util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

ATOL_FLOOR = _module.ATOL_FLOOR
check_close = _module.check_close
