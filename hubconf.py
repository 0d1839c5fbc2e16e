"""torch.hub entry points for psp-zoo: thin calls into :func:`psp_zoo.create_model`.

    model = torch.hub.load("<owner>/psp-zoo", "pspnet", "pspnet_r50-d8_512x1024_40k_cityscapes")
    names = torch.hub.load("<owner>/psp-zoo", "list_models")

The weights are fetched and verified into torch.hub's checkpoint folder (or ``$PSP_ZOO_HOME``);
``manifest=``, ``mirror=``, ``offline=``, ``cache_dir=`` and ``device=`` pass through.
"""
# torch.hub checks that these modules can be imported before it loads this file.
dependencies = ["torch", "numpy", "yaml", "requests", "filelock", "tqdm"]

from psp_zoo import create_model as _create_model  # noqa: E402 (torch.hub reads `dependencies` first)
from psp_zoo import list_models as _list_models  # noqa: E402


def pspnet(name: str = "pspnet_r50-d8_512x1024_40k_cityscapes", pretrained: bool = True, **kwargs):
    """PSPNet of a published mmsegmentation checkpoint, in eval mode, with its weights.

    ``name`` is a checkpoint name, alias or file stem from ``list_models()``; ``pretrained=False``
    gives random weights. Other keywords (``manifest``, ``mirror``, ``offline``, ``cache_dir``,
    ``device``, ``checkpoint``) go to ``psp_zoo.create_model``.
    """
    return _create_model(name, pretrained=pretrained, **kwargs)


def list_models(dataset=None, pattern=None, manifest=None) -> list:
    """Names ``pspnet`` accepts, filtered by dataset key and a shell wildcard."""
    return _list_models(dataset, pattern, manifest=manifest)
