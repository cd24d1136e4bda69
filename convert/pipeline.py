"""One conversion run: checkpoint -> language-model GGUF + mmproj GGUF (+ Ollama Modelfile).

checkpoint reader -> tensor mapping (lm_plan.py, mmproj_plan.py) -> quantizer (minicpmv.quant) -> GGUF writer,
with one progress bar over every tensor of both files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from minicpmv import quant
from minicpmv.schema import LM_ARCH, MMPROJ_ARCH

from . import lm_plan, mmproj_plan
from .checkpoint import Checkpoint
from .config import CheckpointError, load_config
from .layout import validate
from .plan import TensorPlan
from .tokenizer import load_vocab
from .writer import OutputSet, check_output, remove_stale_partials, write_gguf_file

MODEL_NAME = "MiniCPM-V-4.5"


@dataclass
class ConvertResult:
    lm_path: Path | None
    mmproj_path: Path | None
    modelfile: Path | None


def lm_file_name(type_name: str) -> str:
    """The language model's file name for a type ("Q4_K_M" -> MiniCPM-V-4.5-Q4_K_M.gguf)."""
    return f"{MODEL_NAME}-{type_name}.gguf"


def mmproj_file_name(type_name: str) -> str:
    """The vision projector's file name for a type ("f16" -> mmproj-MiniCPM-V-4.5-F16.gguf)."""
    return f"mmproj-{MODEL_NAME}-{type_name.upper()}.gguf"


def convert(
    ckpt_dir: Path,
    out_dir: Path,
    *,
    quant_type: str = "Q4_K_M",
    mmproj_type: str = "f16",
    imatrix: Path | None = None,
    ollama: bool = False,
    force: bool = False,
    threads: int | None = None,
    progress: bool = True,
    write_lm: bool = True,
    write_mmproj: bool = True,
    log: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert `ckpt_dir` into `out_dir`. Every output is written under a temporary name and the set
    renamed at the end: an error, Ctrl-C or a handled signal leaves the folder as it was. `log`
    receives one-line notes (e.g. leftovers of an interrupted run that were removed)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    spec = quant.parse_type(quant_type) if write_lm else None
    mm_spec = mmproj_plan.parse_mmproj_type(mmproj_type)
    cfg = load_config(ckpt_dir)
    ckpt = Checkpoint(ckpt_dir)
    validate(ckpt, cfg)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: output path exists and is not a folder")
    if out_dir.resolve() == ckpt_dir.resolve():
        raise CheckpointError(f"{out_dir}: output folder is the checkpoint folder; choose another -o")

    lm_path = out_dir / lm_file_name(spec.name if spec else quant_type.upper())
    mm_path = out_dir / mmproj_file_name(mm_spec)
    jobs: list[tuple[Path, str, object, list[TensorPlan]]] = []
    if ollama:
        from .modelfile import MODELFILE_NAME

        check_output(out_dir / MODELFILE_NAME, force)  # refuse before spending minutes converting

    if write_lm:
        check_output(lm_path, force)
        raw_cfg = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
        vocab = load_vocab(ckpt_dir, cfg.text.vocab_size, raw_cfg)
        plans = lm_plan.lm_plans(ckpt, cfg)
        imat = (
            quant.load_imatrix(imatrix, [p.name for p in plans], shapes={p.name: p.shape for p in plans})
            if imatrix
            else None
        )
        # with an imatrix llama-quantize changes a few choices (e.g. Q4_0's first ffn_down -> Q4_1)
        shapes = [(p.name, p.shape) for p in plans]
        types = quant.lm_tensor_types(
            shapes,
            spec,
            cfg.text.num_hidden_layers,
            n_gqa=cfg.text.num_attention_heads // cfg.text.num_key_value_heads,
            has_imatrix=imat is not None,
        )
        if imat is None:
            need = quant.first_needing_imatrix(shapes, types, spec)
            if need:
                raise ValueError(
                    f"--quant {spec.name} needs an importance matrix, as in llama-quantize (tensor "
                    f"{need[0]} would be {need[1].name}); pass --imatrix FILE (minicpm-imatrix makes one)"
                )
        imat_meta = quant.imatrix_metadata(imatrix) if imatrix else {}
        for p, t in zip(plans, types):
            p.ggml_type = t
            if imat is not None:
                p.meta["imatrix"] = imat.get(p.name)
        n = lm_plan.n_params(plans)

        def lm_meta(w, vocab=vocab, n=n):
            lm_plan.add_lm_metadata(w, cfg, vocab, name=MODEL_NAME, file_type=int(spec.ftype), n_params=n)
            for k, v in imat_meta.items():  # the keys llama-quantize adds when it uses an imatrix
                (w.add_string if isinstance(v, str) else w.add_uint32)(k, v)

        jobs.append((lm_path, LM_ARCH, lm_meta, plans))

    if write_mmproj:
        check_output(mm_path, force)
        mplans = mmproj_plan.mmproj_plans(ckpt, cfg, mm_spec)

        def mm_meta(w):
            mmproj_plan.add_mmproj_metadata(w, cfg, mm_spec, name=MODEL_NAME)

        jobs.append((mm_path, MMPROJ_ARCH, mm_meta, mplans))

    out_dir.mkdir(parents=True, exist_ok=True)
    n_stale, freed = remove_stale_partials(out_dir)
    if n_stale and log:
        log(
            f"removed {n_stale} unfinished file{'s' if n_stale > 1 else ''} of an interrupted conversion "
            f"from {out_dir} ({freed / 1e9:.2f} GB freed)"
        )
    total = sum(p.n_elements for _, _, _, plans_ in jobs for p in plans_)
    bar = tqdm(total=total, unit="param", unit_scale=True, desc="converting", disable=not progress)

    def encode(x: np.ndarray, p: TensorPlan) -> np.ndarray:
        src = GGMLQuantizationType.BF16 if x.dtype == np.uint16 else None  # raw bf16 rows (raw_rows)
        return quant.encode(x, p.ggml_type, p.meta.get("imatrix"), n_threads=threads, name=p.name, src_type=src)

    def tick(p: TensorPlan) -> None:
        bar.set_postfix_str(f"{p.name} {p.ggml_type.name}", refresh=False)
        bar.update(p.n_elements)

    modelfile = None
    try:
        with OutputSet(force) as outs:
            for path, arch, meta, plans_ in jobs:
                write_gguf_file(outs.add(path), arch, meta, plans_, encode, on_tensor=tick)
            if ollama:
                from .modelfile import write_modelfile

                modelfile = write_modelfile(out_dir, lm_path, mm_path, force=force, outputs=outs)
    finally:
        bar.close()
    return ConvertResult(lm_path if write_lm else None, mm_path if write_mmproj else None, modelfile)
