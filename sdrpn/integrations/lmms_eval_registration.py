"""lmms-eval's entry point for ``--model sdrpn`` (group ``lmms_eval.models``, see setup.py).

lmms-eval loads every entry point of the group while it builds its model registry and turns any
error into a one-line warning, so this module imports nothing at all: the payload is a function
that lmms-eval calls, and the model's heavy module loads only when ``--model sdrpn`` is asked for.
A module-level manifest would import ``lmms_eval.models`` here, which, imported first by anyone
else, would build the registry while this module is still half-loaded and leave ``sdrpn`` out.
"""

MODEL_CLASS = "sdrpn.integrations.lmms_eval.SDRPNLmms"


def manifest():
    """The :class:`ModelManifest` that names ``sdrpn``'s model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="sdrpn", simple_class_path=MODEL_CLASS)
