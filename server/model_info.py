"""What the server says about its one model: /v1/models' entry, Ollama's /api/tags and /api/show,
read from the two GGUF headers (minicpmv.gguf_info: no tensor data)."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf

from minicpmv.gguf_info import read_gguf_info

CAPABILITIES = ["completion", "vision", "thinking"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_path: Path
    mmproj_path: Path
    size: int  # bytes of both files
    modified: float  # newest mtime of the two
    n_params: int
    family: str
    quant: str
    context_length: int

    @classmethod
    def read(cls, name: str, model_path: Path, mmproj_path: Path) -> "ModelInfo":
        lm, mm = read_gguf_info(model_path), read_gguf_info(mmproj_path)
        arch = str(lm.metadata.get(gguf.Keys.General.ARCHITECTURE, ""))
        ftype = lm.metadata.get(gguf.Keys.General.FILE_TYPE)
        try:
            quant = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
        except ValueError:
            quant = str(ftype)
        n = sum(t.n_elements for info in (lm, mm) for t in info.tensors.values())
        ctx = int(lm.metadata.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch), 0) or 0)
        st = [Path(p).stat() for p in (model_path, mmproj_path)]
        return cls(
            name,
            Path(model_path),
            Path(mmproj_path),
            sum(s.st_size for s in st),
            max(s.st_mtime for s in st),
            n,
            arch,
            quant,
            ctx,
        )

    @property
    def parameter_size(self) -> str:
        """As Ollama writes it: "8.7B", "494.03M"."""
        return f"{self.n_params / 1e9:.1f}B" if self.n_params >= 1e9 else f"{self.n_params / 1e6:.2f}M"

    @property
    def digest(self) -> str:
        """Names this pair of files (paths, sizes, times), not their bytes: hashing 6 GB would take a minute."""
        key = f"{self.model_path.resolve()}|{self.mmproj_path.resolve()}|{self.size}|{self.modified}"
        return hashlib.sha256(key.encode()).hexdigest()

    def details(self) -> dict:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family, "clip"],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quant,
        }

    def meta(self) -> dict:
        return {
            "n_params": self.n_params,
            "size": self.size,
            "n_ctx_train": self.context_length,
            "quantization": self.quant,
            "files": [self.model_path.name, self.mmproj_path.name],
        }

    def tag(self) -> dict:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": _iso(self.modified),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def show(self) -> dict:
        return {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": self.details(),
            "model_info": {
                "general.architecture": self.family,
                "general.parameter_count": self.n_params,
                f"{self.family}.context_length": self.context_length,
            },
            "capabilities": CAPABILITIES,
            "modified_at": _iso(self.modified),
        }


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")
