"""minicpmv: GGUF exporter and on-device runtime for MiniCPM-V 4.5.

Subpackages: `minicpmv.convert` (checkpoint -> GGUF), `minicpmv.quant` (llama.cpp's quantization
mixtures), `minicpmv.runtime` (vision in torch, language model in llama.cpp, chat), `minicpmv.cli`
(the commands). Modules here are shared by all of them: `schema` (GGUF names, the checkpoint <-> GGUF
tensor table, the model's constants), `gguf_info` (a GGUF's identity, read fast; which file is which),
`sincos` (the resampler's position tables), `cpu` (CPU facts, thread counts).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("minicpmv")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
