"""Choosing the model source and the files of a Hub repo by name (no network, no files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicpmv.hub.files import RepoFilesError, checkpoint_files, quant_label, select_gguf
from minicpmv.hub.source import DEFAULT_MODEL, ModelSourceError, choose_model, looks_like_repo_id, parse_hub_ref

OPENBMB = [
    "ggml-model-Q4_K_M.gguf",
    "ggml-model-Q4_K.gguf",
    "ggml-model-Q4_K_S.gguf",
    "ggml-model-Q8_0.gguf",
    "ggml-model-F16.gguf",
    "ggml-model-BF16.gguf",
    "mmproj-model-f16.gguf",
    "README.md",
    ".gitattributes",
]


@pytest.mark.parametrize(
    "quant, lm",
    [
        ("Q4_K_M", "ggml-model-Q4_K_M.gguf"),
        ("q4_k_m", "ggml-model-Q4_K_M.gguf"),
        ("Q4_K", "ggml-model-Q4_K.gguf"),
        ("f16", "ggml-model-F16.gguf"),
        ("BF16", "ggml-model-BF16.gguf"),
        ("q8_0", "ggml-model-Q8_0.gguf"),
    ],
)
def test_quant_is_a_whole_word_of_the_name(quant, lm):
    pair = select_gguf(OPENBMB, "o/r", quant)
    assert pair.lm == (lm,) and pair.mmproj == "mmproj-model-f16.gguf"


def test_missing_quant_lists_what_the_repo_has():
    with pytest.raises(
        RepoFilesError,
        match=r"^o/r has no language-model GGUF of quant Q5_K_M; "
        r"available: BF16, F16, Q4_K, Q4_K_M, Q4_K_S, Q8_0$",
    ):
        select_gguf(OPENBMB, "o/r", "Q5_K_M")


def test_ambiguous_quant():
    with pytest.raises(RepoFilesError, match="several language-model GGUFs match Q4_K_M"):
        select_gguf(["a-Q4_K_M.gguf", "b-Q4_K_M.gguf", "mmproj-f16.gguf"], "o/r", "Q4_K_M")


def test_our_names_and_subfolders():
    pair = select_gguf(["gguf/MiniCPM-V-4.5-Q4_K_M.gguf", "gguf/mmproj-MiniCPM-V-4.5-F16.gguf"], "o/r", "q4_k_m")
    assert pair.files == ("gguf/MiniCPM-V-4.5-Q4_K_M.gguf", "gguf/mmproj-MiniCPM-V-4.5-F16.gguf")


def test_split_language_model_is_one_choice_with_all_parts():
    names = ["m-Q8_0-00002-of-00002.gguf", "m-Q8_0-00001-of-00002.gguf", "m-Q4_K_M.gguf", "mmproj-f16.gguf"]
    assert select_gguf(names, "o/r", "Q8_0").lm == ("m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf")


def test_default_quant_falls_back_to_the_only_language_model_but_an_asked_one_does_not():
    names = ["model-Q6_K.gguf", "mmproj.gguf"]
    assert select_gguf(names, "o/r", "Q4_K_M", quant_given=False).lm == ("model-Q6_K.gguf",)
    with pytest.raises(RepoFilesError, match="available: Q6_K"):
        select_gguf(names, "o/r", "Q4_K_M", quant_given=True)


def test_mmproj_choice():
    names = ["m-Q4_K_M.gguf", "mmproj-model-f16.gguf", "mmproj-model-q8_0.gguf", "mmproj-model-bf16.gguf"]
    assert select_gguf(names, "o/r", "Q4_K_M").mmproj == "mmproj-model-f16.gguf"  # default f16
    assert select_gguf(names, "o/r", "Q4_K_M", mmproj_quant="Q8_0").mmproj == "mmproj-model-q8_0.gguf"
    with pytest.raises(RepoFilesError, match="no mmproj of type f32; available: BF16, F16, Q8_0"):
        select_gguf(names, "o/r", "Q4_K_M", mmproj_quant="f32")
    with pytest.raises(RepoFilesError, match=r"several mmproj files \(BF16, Q8_0\); choose one with --mmproj-quant"):
        select_gguf(["m-Q4_K_M.gguf", "mmproj-bf16.gguf", "mmproj-q8_0.gguf"], "o/r", "Q4_K_M")


def test_repos_without_a_pair():
    with pytest.raises(RepoFilesError, match="no mmproj GGUF"):
        select_gguf(["ggml-model-Q4_K_M.gguf"], "o/r", "Q4_K_M")
    with pytest.raises(RepoFilesError, match="minicpm-convert o/r -o OUT"):
        select_gguf(["config.json", "model-00001-of-00002.safetensors"], "o/r", "Q4_K_M")


def test_quant_label():
    assert [
        quant_label(n)
        for n in ("ggml-model-Q4_K_M.gguf", "mmproj-model-f16.gguf", "x-bf16.gguf", "x-IQ4_XS.gguf", "x.gguf")
    ] == ["Q4_K_M", "F16", "BF16", "IQ4_XS", None]


def test_checkpoint_files_are_what_conversion_reads():
    names = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "pytorch_model.bin",
        "model.pt",
        "assets/demo.png",
        "modeling_minicpmv.py",
        "README.md",
        "subdir/config.json",
    ]
    got = checkpoint_files(names, "o/r")
    assert got == sorted(n for n in names[:11])
    with pytest.raises(RepoFilesError, match="minicpm-run --hf o/r"):
        checkpoint_files(["ggml-model-Q4_K_M.gguf", "mmproj-model-f16.gguf"], "o/r")


@pytest.mark.parametrize(
    "s, ok",
    [
        ("openbmb/MiniCPM-V-4_5-gguf", True),
        ("a/b", True),
        ("a.b/c_d-e", True),
        ("./x", False),
        ("../x/y", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("name", False),
        ("a/b.", False),
        ("a/-b", False),
        ("a--b/c", False),
        ("a/b..c", False),
    ],
)
def test_repo_id_shape(s, ok):
    assert looks_like_repo_id(s) is ok


def test_hub_ref():
    r = parse_hub_ref("openbmb/MiniCPM-V-4_5-gguf:q8_0")
    assert (r.repo, r.quant, r.quant_given) == ("openbmb/MiniCPM-V-4_5-gguf", "q8_0", True)
    r = parse_hub_ref("someone/repo")
    assert (r.quant, r.quant_given) == ("Q4_K_M", False)
    with pytest.raises(ModelSourceError, match="OWNER/NAME"):
        parse_hub_ref("./folder")


def test_model_precedence(tmp_path):
    env = {"MINICPMV_MODEL": "env/repo:Q8_0"}
    d = tmp_path / "d"
    d.mkdir()
    assert choose_model(model_dir=d, env=env).path == d
    assert choose_model(Path("lm.gguf"), Path("mm.gguf"), env=env).mmproj == Path("mm.gguf")
    assert choose_model(hf="a/b:Q6_K", env=env).hub.repo == "a/b"
    c = choose_model(env=env)
    assert (c.origin, c.hub.repo, c.hub.quant) == ("MINICPMV_MODEL", "env/repo", "Q8_0")
    assert choose_model(env={"MINICPMV_MODEL": str(d)}).path == d
    c = choose_model(env={})
    assert (c.origin, f"{c.hub.repo}:{c.hub.quant}") == ("default", DEFAULT_MODEL)
    with pytest.raises(ModelSourceError, match="neither a folder nor"):
        choose_model(env={"MINICPMV_MODEL": str(tmp_path / "missing" / "x" / "y")})
    with pytest.raises(ModelSourceError, match="not both"):
        choose_model(model_dir=d, hf="a/b")
    with pytest.raises(ModelSourceError, match="--mmproj is required"):
        choose_model(Path("lm.gguf"))
