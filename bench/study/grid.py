"""The study's grid: the stores it records (every flavour, p and codec, and the baselines), its options,
and the cells each seed contributes."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import gradstore.codecs
from unlearn.evaluation import MIA_METHOD
from unlearn.runs.config import INT8, LAYER, ORIGINAL, PER_SAMPLE, FLAVOURS as RUN_FLAVOURS

KEEPS = [0.2, 0.1, 0.075, 0.05, 0.02, 0.01]
CODECS = list(gradstore.codecs.CODECS)  # every registered codec may be transcoded to (--codecs)
# The default grid: the whole-byte codecs of the published two-seed study. The sub-byte ones (int4, int2, sign)
# are asked for by name, with p below 0.01 (docs/RESULTS.md, "The frontier below one byte").
DEFAULT_CODECS = ["fp32", "fp16", "int8"]
FLAVOURS = list(RUN_FLAVOURS)  # grad, update
REQUESTS = ["class", "samples", "poisoned"]
MODELS = ["simple", "resnet18"]
# The baselines' stores (the original method's, the layer-wise one): recorded beside ours, or (for models whose
# original store exceeds this disk: ResNet-18's is ~38 GB an epoch on MNIST) left out and the original's size
# computed as steps x M x 4 bytes, raw (recorded original stores are zstd-compressed: 0.66 of that on SimpleModel).
BASELINES = ["recorded", "computed"]


def build_config(args: Any) -> Dict[str, Any]:
    """The study's options (what cells.json and every marker record) from the command line."""
    quick = args.quick
    args.keeps = list(dict.fromkeys(args.keeps))  # a repeated p would name one store twice
    dataset = args.dataset or ("digits" if quick else "mnist")
    if args.keep_first is not None:
        keep_first = args.keep_first or None  # 0: keep every sample of the class
    else:
        keep_first = 100 if dataset == "mnist" else None  # the seed's MNIST protocol
    model = getattr(args, "model", None) or "simple"
    baselines = getattr(args, "baselines", None) or ("recorded" if model == "simple" else "computed")
    return {
        "model": model,
        "baselines": baselines,
        "dataset": dataset,
        "data_dir": args.data_dir,
        "forget_class": args.forget_class,
        "keep_first": keep_first,
        "epochs": args.epochs,
        "batch_size": 64,
        "optimizer": "adam",
        "keeps": args.keeps,
        "codecs": args.codecs,
        "flavours": args.flavours,
        "layer_keep": 0.1,
        "sample_fraction": args.sample_fraction,
        "finetune_epochs": args.finetune_epochs,
        "finetune_samples": args.finetune_samples if args.finetune_samples is not None else (0 if quick else 10_000),
        "seeds": args.seeds if args.seeds is not None else ([0] if quick else [0, 1]),
        "mia": MIA_METHOD,  # cells measured with another MIA are not mixed with these
        "progress": not args.no_progress,
        "engine": args.engine,
        "requests": list(dict.fromkeys(args.request)),
        "poison": args.poison,
        "poison_seed": args.poison_seed,
        "poison_target": args.poison_target,
        "poison_keeps": args.poison_keeps,
        "only_stores": list(dict.fromkeys(args.only_stores)) if getattr(args, "only_stores", None) else None,
    }


def store_name(method: str, flavour: Optional[str] = None, keep: Optional[float] = None,
               codec: Optional[str] = None) -> str:
    """A store's row name: ours-update-p0.1-int8, original, layer-p0.1."""
    if method == PER_SAMPLE:
        return f"ours-{flavour}-p{keep}-{codec}"
    return ORIGINAL if method == ORIGINAL else f"layer-p{keep}"


def cell_id(seed: int, task: str, row: str) -> str:
    """A cell's key in cells.json: seed|task|row (row: a reference row, or a store and its scale mode)."""
    return f"{seed}|{task}|{row}"


def needed_cells(seed: int, config: Dict[str, Any]) -> List[str]:
    """Every cell a seed contributes, by id (reference rows, then each store's scale modes)."""
    baselines: List[Tuple[str, Sequence[str]]] = []
    if recorded_baselines(config):
        baselines = [(store_name(ORIGINAL), ("1",)), (store_name(LAYER, keep=config["layer_keep"]), ("1",))]
    ids = []
    for task in config["requests"]:
        codecs, keeps = ([INT8], config["poison_keeps"]) if task == "poisoned" else (config["codecs"], config["keeps"])
        stores = baselines + [(store_name(PER_SAMPLE, flavour, keep, codec), ("1", "auto"))
                              for flavour in config["flavours"] for keep in keeps for codec in codecs]
        fine_tuned = config["finetune_epochs"] and task in ("class", "poisoned")
        ids += [cell_id(seed, task, kind) for kind in ["after train", "retrain"] + (["finetune only"] if fine_tuned else [])]
        ids += [cell_id(seed, task, f"{name}|{mode}") for name, modes in stores for mode in modes]
    return ids


def recorded_baselines(config: Dict[str, Any]) -> bool:
    """Whether the study records the original method's and the layer-wise stores (else the original's size is
    computed)."""
    return config.get("baselines", "recorded") == "recorded"
