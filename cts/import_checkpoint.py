"""Import checkpoints of the original Segmenter code and of the CTS authors' code
(``cts import_checkpoint``; ``cts.load_model`` imports them on the fly).

Both save ``checkpoint.pth`` = ``{"model": state_dict, ...}`` with ``variant.yml`` beside
it (``net_kwargs``: the architecture). rstrudel/segmenter's state dict holds ``encoder.*``
(their ViT) and ``decoder.*``; tue-mps/cts-segmenter's adds ``policy_net.backbone.*`` (timm
efficientnet_lite0, features_only) and ``policy_net.head.*``. The import maps their names
onto this project's model, sets what their code computes differently from timm's ViT
(LayerNorm eps 1e-5, the policy net fed the segmenter's normalised images) and loads the
weights strictly: anything that does not fit is an error naming the keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from cts.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    segmenter_from_payload,
    segmenter_payload,
    set_num_tokens_shared,
    stored_eval_geometry,
)
from cts.geometry import check_num_shared, num_superpatches, superpatch_size
from cts.inference import EvalGeometry
from cts.models import POLICIES, Segmenter, SegmenterConfig
from cts.models.policy import IMAGENET_MEAN, IMAGENET_STD
from cts.models.pretrained import fit_report
from cts.models.vit import backbone_patch_size

LAYOUT_SEGMENTER = "rstrudel/segmenter"
LAYOUT_CTS = "tue-mps/cts-segmenter"
CHECKPOINT_NAME = "checkpoint.pth"
VARIANT_NAME = "variant.yml"
# What every original checkpoint holds; a decoder too (decoder.cls_emb or decoder.head.*).
EXPECTED_KEYS = (
    "encoder.patch_embed.proj.weight",
    "encoder.cls_token",
    "encoder.pos_embed",
    "encoder.blocks.0.attn.qkv.weight",
    "encoder.norm.weight",
)
DECODER_KEYS = ("decoder.cls_emb", "decoder.head.weight")
NORMALIZATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "deit": (IMAGENET_MEAN, IMAGENET_STD),
}
# timm ViTs by (width, heads, distilled), for backbone names timm does not have
# (e.g. Segmenter's vit_base_patch8_384); a patch-size override completes them.
FALLBACK_BACKBONES = {
    (192, 3, False): "vit_tiny_patch16_384",
    (384, 6, False): "vit_small_patch16_384",
    (768, 12, False): "vit_base_patch16_384",
    (1024, 16, False): "vit_large_patch16_384",
    (192, 3, True): "deit_tiny_distilled_patch16_224",
    (384, 6, True): "deit_small_distilled_patch16_224",
    (768, 12, True): "deit_base_distilled_patch16_384",
}
# Their ViT and decoder use torch's default LayerNorm eps; timm's ViT uses 1e-6.
ORIGINAL_LAYER_NORM_EPS = 1e-5


class _VariantLoader(yaml.SafeLoader):
    """Safe YAML plus the tuples ``yaml.dump`` writes for image_size / policy_schedule."""


_VariantLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint.pth, variant.yml)`` from the checkpoint, its folder or the variant."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.is_dir():
        folder, checkpoint = path, None
    elif path.suffix.lower() in (".yml", ".yaml"):
        folder, checkpoint = path.parent, None
    else:
        folder, checkpoint = path.parent, path
    if checkpoint is None:
        checkpoint = folder / CHECKPOINT_NAME
        if not checkpoint.is_file():
            candidates = sorted(folder.glob("*.pth"))
            if len(candidates) != 1:
                raise FileNotFoundError(
                    f"no {CHECKPOINT_NAME} in {folder} (found {len(candidates)} .pth files): "
                    "give the checkpoint file itself"
                )
            checkpoint = candidates[0]
    variant = path if path.suffix.lower() in (".yml", ".yaml") else folder / VARIANT_NAME
    if not variant.is_file():
        raise FileNotFoundError(
            f"{variant} not found: an original Segmenter/CTS checkpoint needs the variant.yml "
            "its training wrote beside checkpoint.pth (net_kwargs: the architecture)"
        )
    return checkpoint, variant


def read_variant(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            variant = yaml.load(f, Loader=_VariantLoader)
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not a readable variant.yml: {error}") from error
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise ValueError(f"{path} has no net_kwargs mapping: not a Segmenter variant.yml")
    return variant


def _state_dict(payload: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(payload, dict) and payload.get("kind") == "cts.segmenter":
        raise ValueError(f"{path} is already a cts checkpoint: use it as it is")
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        found = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path}: unknown checkpoint layout; expected {{'model': state_dict}} with keys "
            f"{', '.join(EXPECTED_KEYS)}, decoder.*; found {found}"
        )
    return state


def detect_layout(state: dict[str, Tensor], path: str | os.PathLike = "checkpoint") -> str:
    """``rstrudel/segmenter`` or ``tue-mps/cts-segmenter``; a ValueError for anything else."""
    missing = [k for k in EXPECTED_KEYS if k not in state]
    if missing or not any(k in state for k in DECODER_KEYS):
        found = ", ".join(list(state)[:8]) or "none"
        raise ValueError(
            f"{path}: unknown checkpoint layout (neither {LAYOUT_SEGMENTER} nor {LAYOUT_CTS}); "
            f"expected keys {', '.join(EXPECTED_KEYS)} and {' or '.join(DECODER_KEYS)}; "
            f"found {len(state)} keys, first: {found}"
        )
    return LAYOUT_CTS if any(k.startswith("policy_net.") for k in state) else LAYOUT_SEGMENTER


def convert_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Their names -> ours; returns (converted, dropped keys: the ViT's classifier heads)."""
    converted, dropped = {}, []
    for key, value in state.items():
        if key.startswith("encoder."):
            name = key.removeprefix("encoder.")
            if name.split(".")[0] in ("head", "head_dist"):
                dropped.append(key)
                continue
            converted[f"encoder.vit.{name}"] = value
        else:  # decoder.* and policy_net.* have our names already; others fail the fit check
            converted[key] = value
    return converted, dropped


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)


def _backbone_fits(name: str, width: int, heads: int, distilled: bool) -> bool:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if name not in timm.list_models():
        return False
    with torch.device("meta"):
        vit = timm.create_model(name, num_classes=0)
    return (
        isinstance(vit, VisionTransformer)
        and vit.embed_dim == width
        and vit.blocks[0].attn.num_heads == heads
        and vit.blocks[0].mlp.fc1.out_features == 4 * width
        and vit.cls_token is not None
        and not vit.no_embed_class
        and vit.reg_token is None
        and (getattr(vit, "dist_token", None) is not None) == distilled
        and isinstance(vit.norm_pre, nn.Identity)
        and isinstance(vit.norm, nn.LayerNorm)
    )


def timm_backbone(name: str | None, width: int, heads: int, distilled: bool) -> str:
    """The variant's backbone when timm builds it with the same shape, else a standard one."""
    for candidate in (name, FALLBACK_BACKBONES.get((width, heads, distilled))):
        if candidate and _backbone_fits(candidate, width, heads, distilled):
            return candidate
    kind = "distilled " if distilled else ""
    raise ValueError(
        f"backbone mismatch: no timm ViT matches backbone {name!r} with d_model {width}, "
        f"{heads} heads ({kind}ViT, MLP 4x); supported widths/heads: "
        + ", ".join(f"{w}/{h}{' distilled' if d else ''}" for w, h, d in FALLBACK_BACKBONES)
    )


REQUIRED_NET_KWARGS = ("d_model", "n_heads", "n_layers", "patch_size", "image_size", "decoder")


def _crop_size(net: dict[str, Any], where: str) -> int:
    """The variant's square ``image_size`` (an int or a pair)."""
    size = net["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if size[0] != size[1]:
        raise ValueError(f"{where}: image_size {size} is not square; only square crops import")
    return size[0]


def _check_encoder_weights(
    state: dict[str, Tensor], width: int, patch: int, layers: int, where: str
) -> None:
    """The patch embedding's width and patch size and the block count the weights have
    (``encoder.patch_embed.proj.weight``: ``(width, 3, patch, patch)``) match the variant."""
    proj = state["encoder.patch_embed.proj.weight"]
    weights_blocks = _count_blocks(state, "encoder.blocks")
    if (proj.shape[0], proj.shape[-1], weights_blocks) != (width, patch, layers):
        raise ValueError(
            f"backbone mismatch: {where} says d_model {width}, patch {patch}, {layers} blocks; "
            f"the weights have width {proj.shape[0]}, patch {proj.shape[-1]}, "
            f"{weights_blocks} blocks"
        )


def _decoder_kwargs(net: dict[str, Any]) -> dict[str, Any]:
    """``net_kwargs.decoder``: a mapping, or just the decoder's name."""
    return net["decoder"] if isinstance(net["decoder"], dict) else {"name": net["decoder"]}


def _decoder(
    decoder_cfg: dict[str, Any], state: dict[str, Tensor], where: str
) -> tuple[str, int, dict[str, Any]]:
    """``(decoder, classes in its weights, its extra config)`` for a mask transformer
    (``decoder.cls_emb``: ``(1, n_cls, d)``) or a linear decoder (``decoder.head.weight``:
    ``(n_cls, d)``)."""
    decoder_name = str(decoder_cfg.get("name", ""))
    if decoder_name == "mask_transformer":
        if "decoder.cls_emb" not in state:
            raise ValueError(f"{where} says mask_transformer; the weights hold no decoder.cls_emb")
        decoder_layers = int(decoder_cfg.get("n_layers", 2))
        if decoder_layers != _count_blocks(state, "decoder.blocks"):
            raise ValueError(
                f"decoder mismatch: {where} says {decoder_layers} decoder layers, the weights "
                f"have {_count_blocks(state, 'decoder.blocks')}"
            )
        classes = int(state["decoder.cls_emb"].shape[1])
        return "mask_transformer", classes, {"decoder_layers": decoder_layers}
    if "linear" in decoder_name:
        if "decoder.head.weight" not in state:
            raise ValueError(f"{where} says a linear decoder; the weights hold no decoder.head")
        return "linear", int(state["decoder.head.weight"].shape[0]), {}
    raise ValueError(
        f"{where}: decoder {decoder_name!r} cannot be imported (mask_transformer, linear)"
    )


def _num_classes(net: dict[str, Any], weight_classes: int, where: str) -> int:
    """``n_cls`` of the variant, which must be the decoder weights' (their count if unset)."""
    num_classes = int(net.get("n_cls") or weight_classes)
    if num_classes != weight_classes:
        raise ValueError(
            f"class count mismatch: {where} says n_cls {num_classes}, the decoder weights "
            f"hold {weight_classes} classes"
        )
    return num_classes


def _normalization(
    variant: dict[str, Any], backbone: str, where: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the original model was trained with: the variant's named
    normalization, else the backbone's."""
    net = variant["net_kwargs"]
    norm_name = net.get("normalization") or variant.get("dataset_kwargs", {}).get("normalization")
    if norm_name is None:
        from cts.models import backbone_normalization

        mean, std = backbone_normalization(backbone)
    elif norm_name in NORMALIZATION:
        mean, std = NORMALIZATION[norm_name]
    else:
        raise ValueError(f"{where}: normalization {norm_name!r}: known {', '.join(NORMALIZATION)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _policy(state: dict[str, Tensor], policy: str | None) -> str:
    """The policy asked for, by default the checkpoint's policy net when it holds one."""
    has_policy = any(k.startswith("policy_net.") for k in state)
    policy = policy or ("policy_net" if has_policy else "none")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}': use one of {', '.join(POLICIES)}")
    if policy == "policy_net" and not has_policy:
        raise ValueError(
            f"this checkpoint holds no policy network ({LAYOUT_SEGMENTER} layout): import it "
            "with --policy none (no sharing), random or oracle"
        )
    return policy


def _num_tokens_shared(
    net: dict[str, Any], policy: str, num_tokens_shared: int | None, where: str
) -> int:
    """K asked for, by default the one the CTS model was trained with (the end of its
    ``policy_schedule``), 0 without a policy."""
    schedule = net.get("policy_schedule")
    if num_tokens_shared is None:
        if policy == "none":
            num_tokens_shared = 0
        elif isinstance(schedule, list | tuple) and len(schedule) == 2 and schedule[1] is not None:
            num_tokens_shared = int(schedule[1])
        else:
            raise ValueError(f"{where} has no policy_schedule: give --num-tokens-shared K")
    if policy == "none" and num_tokens_shared:
        raise ValueError(
            f"num_tokens_shared={num_tokens_shared} needs a policy to pick the superpatches "
            "(policy_net, random or oracle), not none"
        )
    return num_tokens_shared


def _check_k_fits_crop(num_tokens_shared: int, crop: int, patch: int) -> None:
    """K within the crop's superpatches; a crop they do not tile is left to the model,
    which refuses it naming the superpatch size."""
    if crop % superpatch_size(patch) == 0:
        check_num_shared(num_tokens_shared, num_superpatches(crop, patch), f"crop_size {crop}")


def config_from_variant(
    variant: dict[str, Any],
    state: dict[str, Tensor],
    num_tokens_shared: int | None = None,
    policy: str | None = None,
    where: str = "variant.yml",
) -> SegmenterConfig:
    """The SegmenterConfig that rebuilds the original model; checks it against the weights."""
    net = variant["net_kwargs"]
    missing = [k for k in REQUIRED_NET_KWARGS if k not in net]
    if missing:
        raise ValueError(f"{where}: net_kwargs lacks {', '.join(missing)}")
    width, heads, layers = int(net["d_model"]), int(net["n_heads"]), int(net["n_layers"])
    patch = int(net["patch_size"])
    crop = _crop_size(net, where)
    _check_encoder_weights(state, width, patch, layers, where)
    distilled = bool(net.get("distilled")) or "encoder.dist_token" in state
    backbone = timm_backbone(net.get("backbone"), width, heads, distilled)

    decoder_cfg = _decoder_kwargs(net)
    decoder, weight_classes, decoder_extra = _decoder(decoder_cfg, state, where)
    num_classes = _num_classes(net, weight_classes, where)
    mean, std = _normalization(variant, backbone, where)
    policy = _policy(state, policy)
    num_tokens_shared = _num_tokens_shared(net, policy, num_tokens_shared, where)
    _check_k_fits_crop(num_tokens_shared, crop, patch)
    extra: dict[str, Any] = {"layer_norm_eps": ORIGINAL_LAYER_NORM_EPS, **decoder_extra}
    if policy == "policy_net":
        extra["policy_input_norm"] = "none"  # their policy net reads the normalised images
    return SegmenterConfig(
        backbone=backbone,
        num_classes=num_classes,
        crop_size=crop,
        num_tokens_shared=num_tokens_shared,
        policy=policy,
        decoder=decoder,
        depth=layers,
        patch_size=patch if patch != backbone_patch_size(backbone) else None,
        pretrained=False,
        drop_path_rate=float(net.get("drop_path_rate", 0.1)),
        dropout=float(decoder_cfg.get("dropout", net.get("dropout", 0.1))),
        policy_feature_stride=32,
        policy_input_scale=1.0,
        mean=mean,
        std=std,
        extra=extra,
    )


def import_checkpoint(
    path: str | os.PathLike,
    num_tokens_shared: int | None = None,
    policy: str | None = None,
    payload: Any = None,
    trust: bool = False,
) -> tuple[Segmenter, dict[str, Any]]:
    """Build this project's Segmenter from an original checkpoint (eval mode, CPU).

    Args:
        path: ``checkpoint.pth``, its folder, or the ``variant.yml`` beside it.
        num_tokens_shared: K (default: the CTS checkpoint's policy_schedule, 0 without policy).
        policy: none | policy_net | random | oracle (default: policy_net when the checkpoint
            holds a policy network, else none).
        payload: the checkpoint file's content when already read.
        trust: unpickle any object the file holds (can run code: trusted files only).

    Returns:
        The model and a description of the source (layout, files, dropped keys).
    """
    checkpoint, variant_path = locate(path)
    if payload is None or Path(path).expanduser().resolve() != checkpoint.resolve():
        # Tensors and plain values unless trusted: the original snapshots hold nothing else.
        payload = load_checkpoint(checkpoint, trust=trust)
    state = _state_dict(payload, checkpoint)
    layout = detect_layout(state, checkpoint)
    variant = read_variant(variant_path)
    config = config_from_variant(variant, state, num_tokens_shared, policy, str(variant_path))
    converted, dropped = convert_state_dict(state)
    if config.policy != "policy_net":
        dropped += [k for k in converted if k.startswith("policy_net.")]
        converted = {k: v for k, v in converted.items() if not k.startswith("policy_net.")}
    model = Segmenter(config)
    problems = fit_report(
        model.state_dict(), converted, shown=6, line="{label} keys ({count}): {keys}"
    )
    if problems:
        raise ValueError(
            f"{checkpoint} ({layout}) does not fit the model {variant_path} describes "
            f"({config.backbone}, {config.depth} blocks, {config.num_classes} classes): "
            + "; ".join(problems)
        )
    model.load_state_dict(converted)
    source = {
        "layout": layout,
        "checkpoint": str(checkpoint),
        "variant": str(variant_path),
        "backbone": variant["net_kwargs"].get("backbone"),
        "dropped_keys": dropped,
    }
    return model.eval(), source


def import_to_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    num_tokens_shared: int | None = None,
    policy: str | None = None,
    trust: bool = False,
) -> tuple[Path, Segmenter, dict[str, Any]]:
    """Import and write a cts checkpoint (``segmenter_payload`` + ``source``) atomically."""
    model, source = import_checkpoint(path, num_tokens_shared, policy, trust=trust)
    written = save_checkpoint(out, segmenter_payload(model, source=source))
    return written, model, source


def summary(written: Path, model: Segmenter, source: dict[str, Any]) -> str:
    """One line: the original checkpoint, the model it became and the file written."""
    config = model.config
    unused = len(source["dropped_keys"])
    dropped = f", dropped {unused} unused keys" if unused else ""
    return (
        f"imported {source['layout']} {source['backbone']} -> {config.backbone} "
        f"({config.depth} blocks, {config.num_classes} classes, crop {config.crop_size}, "
        f"policy {config.policy}, K {model.num_tokens_shared}{dropped}): {written}"
    )


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    num_tokens_shared: int | None = None,
    policy: str | None = None,
    trust: bool = False,
) -> Segmenter:
    """A Segmenter in eval mode from a cts checkpoint or an original one (imported on the fly).

    Calling it on normalised ``(B, 3, H, W)`` float images returns a ``SegmenterOutput``
    (logits first). ``num_tokens_shared`` overrides K; ``policy`` applies to imports only.
    ``trust`` unpickles any object the file holds: it can run code, trusted files only.
    """
    return load_model_and_geometry(path, device, num_tokens_shared, policy, trust)[0]


def load_model_and_geometry(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    num_tokens_shared: int | None = None,
    policy: str | None = None,
    trust: bool = False,
) -> tuple[Segmenter, EvalGeometry | None]:
    """:func:`load_model` and the evaluation sizes the checkpoint stores (None: an import or
    a checkpoint written before they were stored)."""
    path = Path(path).expanduser()
    payload = None
    if path.is_file() and path.suffix.lower() not in (".yml", ".yaml"):
        payload = load_checkpoint(path, trust=trust)
    if not (isinstance(payload, dict) and payload.get("kind") == "cts.segmenter"):
        model, _ = import_checkpoint(path, num_tokens_shared, policy, payload=payload, trust=trust)
        return model.to(device).eval(), None
    if policy is not None:
        raise ValueError(f"{path} is a cts checkpoint with a fixed policy; policy is for imports")
    model = segmenter_from_payload(payload, path)
    if num_tokens_shared is not None:
        set_num_tokens_shared(model, num_tokens_shared, str(path))
    return model.to(device).eval(), stored_eval_geometry(payload)
