"""The command line, called in-process through ``nnforge.cli.main``: every subcommand's help, the
compile -> verify -> inspect -> run round trip on an .onnx file, and bad input ending with exit code
2 and one ``nnforge: error:`` line on stderr."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.export import Dim

from nnforge import NnforgeError
from nnforge.cli import EXIT_BAD_INPUT, build_parser, main
from nnforge.targets import REQUIREMENTS

from tests.conftest import tiny_mlp

SUBCOMMANDS = ["compile", "run", "verify", "inspect", "targets", "demo"]


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_model") / "mlp.onnx"
    x = torch.randn(2, 16)
    torch.onnx.export(tiny_mlp(), (x,), str(path), dynamo=True, dynamic_shapes=({0: Dim("batch")},),
                      input_names=["x"], output_names=["y"], verbose=False)
    return path


@pytest.fixture(scope="module")
def cli_bundle(onnx_file, tmp_path_factory) -> Path:
    """A bundle written by `nnforge compile` (the output is checked in test_compile_prints_wrote)."""
    out = tmp_path_factory.mktemp("cli_bundle") / "mlp-onnx"
    rc = main(["compile", str(onnx_file), "--target", "onnx", "--out", str(out), "--dim", "batch=3"])
    assert rc == 0
    return out


@pytest.fixture
def bundle_copy(cli_bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(cli_bundle, dst)
    return dst


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, *fragments):
    assert rc == EXIT_BAD_INPUT == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nnforge: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


# --- help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [[]] + [[c] for c in SUBCOMMANDS], ids=["top"] + SUBCOMMANDS)
def test_help_exits_zero(capsys, cmd):
    with pytest.raises(SystemExit) as ei:
        main(cmd + ["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nnforge")
    if cmd:
        assert cmd[0] in out.splitlines()[0]
    else:
        assert all(c in out for c in SUBCOMMANDS)


def test_parser_knows_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(SUBCOMMANDS) <= set(sub.choices)


def test_no_or_unknown_subcommand_is_a_usage_error(capsys):
    for argv in ([], ["frobnicate"]):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 2
        assert "usage: nnforge" in capsys.readouterr().err


# --- compile / verify / inspect / run -------------------------------------------------------------
def test_compile_prints_wrote(capsys, onnx_file, tmp_path):
    out = tmp_path / "b"
    rc, stdout, _ = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--out", out)
    assert rc == 0
    assert stdout.startswith(f"wrote {out}")
    assert "runtime checked: True" in stdout and "fidelity vs fp32: cosine mean 1.0000" in stdout
    assert "held-out rows in 1 batch(es): the example inputs (no pass reads data)" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["source"] == "onnx" and m["recipe"]["name"] == "fp32"


def test_compile_with_recipe(capsys, onnx_file, tmp_path):
    out = tmp_path / "b8"
    rc, stdout, _ = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--recipe", "w8", "--out", out)
    assert rc == 0 and stdout.startswith("wrote")
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"]["name"] == "w8"
    assert m["compression"]["bytes_after"] < m["compression"]["bytes_before"]


def test_verify(capsys, cli_bundle):
    rc, out, _ = run_cli(capsys, "verify", cli_bundle)
    assert rc == 0
    assert out.strip().splitlines()[-1] == "verified"
    assert "files intact" in out and "runtime vs expected: cosine" in out
    rc, out, _ = run_cli(capsys, "verify", cli_bundle, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["passed"] is True and report["target"] == "onnx"


def test_inspect(capsys, cli_bundle):
    rc, out, _ = run_cli(capsys, "inspect", cli_bundle, "--layers")
    assert rc == 0
    assert out.startswith(f"bundle {cli_bundle}") and "for onnx (onnx backend)" in out
    layer_lines = [line for line in out.splitlines() if "dense f32" in line]
    assert len(layer_lines) == 2 and all("linear" in line for line in layer_lines)
    rc, out, _ = run_cli(capsys, "inspect", cli_bundle)
    assert rc == 0 and "dense f32" not in out
    rc, out, _ = run_cli(capsys, "inspect", cli_bundle, "--json")
    assert rc == 0 and json.loads(out)["format"] == "nnforge.bundle"
    rc, out, _ = run_cli(capsys, "inspect", cli_bundle, "--graph")
    assert rc == 0 and "linear" in out


def test_inspect_a_model_file(capsys, onnx_file):
    rc, out, _ = run_cli(capsys, "inspect", onnx_file, "--graph")
    assert rc == 0 and "linear" in out and "gelu" in out


def test_run_on_reference_inputs(capsys, cli_bundle):
    rc, out, _ = run_cli(capsys, "run", cli_bundle)
    assert rc == 0
    m = json.loads((cli_bundle / "manifest.json").read_text())
    oname = m["signature"]["outputs"][0]["name"]
    assert out.startswith(f"{oname}: shape [3, 8] dtype float32")


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_run_with_inputs_and_out(capsys, cli_bundle, tmp_path, fmt):
    m = json.loads((cli_bundle / "manifest.json").read_text())
    iname = m["signature"]["inputs"][0]["name"]
    oname = m["signature"]["outputs"][0]["name"]
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    inputs = tmp_path / f"in.{fmt}"
    if fmt == "safetensors":
        save_file({iname: x}, str(inputs))
    else:
        np.savez(inputs, **{iname: x.numpy()})
    outputs = tmp_path / "out.safetensors"
    rc, out, _ = run_cli(capsys, "run", cli_bundle, "--inputs", inputs, "--out", outputs)
    assert rc == 0
    assert f"{oname}: shape [5, 8]" in out and f"wrote {outputs}" in out
    got = load_file(str(outputs))
    assert list(got) == [oname]
    with torch.no_grad():
        want = tiny_mlp()(x)
    torch.testing.assert_close(got[oname], want, rtol=1e-4, atol=1e-5)


def test_targets_lists_onnx_as_runnable(capsys):
    rc, out, _ = run_cli(capsys, "targets")
    assert rc == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:2] == ["target", "backend"]
    onnx_row = next(r for r in rows if r.split()[0] == "onnx")
    assert onnx_row.split()[1:4] == ["onnx", "portable", "yes"]
    rc, out, _ = run_cli(capsys, "targets", "--json")
    table = {t["name"]: t for t in json.loads(out)}
    assert table["onnx"]["runs_here"] == "yes" and table["onnx"]["backend"] == "onnx"
    assert len(table) == len(rows)


# --- bad input: exit 2, one error line ------------------------------------------------------------
def test_nonexistent_model_file(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "compile", tmp_path / "missing.onnx", "--target", "onnx", "--out", tmp_path / "o")
    assert_one_error_line(rc, err, "missing.onnx")
    assert not (tmp_path / "o").exists()


def test_model_that_is_neither_zoo_nor_onnx(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "compile", "model.pt", "--target", "onnx", "--out", tmp_path / "o")
    assert_one_error_line(rc, err, "model.pt")


def test_unknown_target(capsys, onnx_file, tmp_path):
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "tpu9", "--out", tmp_path / "o")
    assert_one_error_line(rc, err, "tpu9")
    assert not (tmp_path / "o").exists()


def test_unknown_recipe(capsys, onnx_file, tmp_path):
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--recipe", "w1-dream", "--out",
                         tmp_path / "o")
    assert_one_error_line(rc, err, "w1-dream")
    assert not (tmp_path / "o").exists()


def test_bad_dim_argument(capsys, onnx_file, tmp_path):
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--dim", "batch=lots", "--out",
                         tmp_path / "o")
    assert_one_error_line(rc, err, "batch=lots")


@pytest.mark.parametrize("cmd", ["verify", "run", "inspect"])
def test_tampered_bundle(capsys, bundle_copy, cmd):
    p = bundle_copy / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    rc, out, err = run_cli(capsys, cmd, bundle_copy)
    assert_one_error_line(rc, err, "weights.safetensors")


def test_verify_missing_bundle(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "verify", tmp_path / "nothing")
    assert_one_error_line(rc, err, "nothing")


def test_run_with_bad_inputs_files(capsys, cli_bundle, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"not_the_input": torch.randn(2, 16)}, str(wrong))
    rc, _, err = run_cli(capsys, "run", cli_bundle, "--inputs", wrong)
    assert_one_error_line(rc, err, "missing input")
    txt = tmp_path / "inputs.txt"
    txt.write_text("1 2 3")
    rc, _, err = run_cli(capsys, "run", cli_bundle, "--inputs", txt)
    assert_one_error_line(rc, err, "inputs.txt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    rc, _, err = run_cli(capsys, "run", cli_bundle, "--inputs", garbage)
    assert_one_error_line(rc, err, "garbage.safetensors")


@pytest.mark.parametrize("case", ["float64", "wrong_shape"])
def test_run_with_inputs_of_the_wrong_dtype_or_shape(capsys, cli_bundle, tmp_path, case):
    """BUG: ONNX Runtime's InvalidArgument is not among the CLI's known errors, so bad --inputs end
    in a traceback instead of exit 2 (float64 could also simply be cast: then rc 0 is fine)."""
    m = json.loads((cli_bundle / "manifest.json").read_text())
    iname = m["signature"]["inputs"][0]["name"]
    arr = np.random.default_rng(0).standard_normal((3, 16) if case == "float64" else (3, 5))
    if case == "wrong_shape":
        arr = arr.astype(np.float32)
    f = tmp_path / "in.npz"
    np.savez(f, **{iname: arr})
    rc, out, err = run_cli(capsys, "run", cli_bundle, "--inputs", f)
    if case == "float64" and rc == 0:
        assert "shape [3, 8]" in out
    else:
        assert_one_error_line(rc, err)


def test_run_refuses_pickled_npz(capsys, cli_bundle, tmp_path):
    m = json.loads((cli_bundle / "manifest.json").read_text())
    iname = m["signature"]["inputs"][0]["name"]
    bad = tmp_path / "pickled.npz"
    np.savez(bad, **{iname: np.array([{"evil": 1}], dtype=object)})
    rc, _, err = run_cli(capsys, "run", cli_bundle, "--inputs", bad)
    assert_one_error_line(rc, err)


def test_run_where_the_target_cannot_run(capsys, cli_bundle, monkeypatch):
    monkeypatch.setitem(REQUIREMENTS, "onnxruntime", lambda: (False, "python package onnxruntime"))
    rc, _, err = run_cli(capsys, "run", cli_bundle)
    assert_one_error_line(rc, err, "cannot run")
    rc, out, _ = run_cli(capsys, "targets")
    assert next(r for r in out.splitlines()[1:] if r.split()[0] == "onnx").split()[3] == "no"


# --- failures of the machine, not the input: one line, nothing left behind --------------------------
def test_out_is_checked_before_the_model_is_read(capsys, onnx_file, tmp_path, monkeypatch):
    out = tmp_path / "afile"
    out.write_text("mine")
    monkeypatch.setattr("nnforge.cli._model_and_inputs", lambda *a: pytest.fail("the model was read first"))
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--out", out)
    assert_one_error_line(rc, err, f"refusing to overwrite {out}", "it is a file", "choose another output directory")
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_os_error_during_compile_is_one_line_after_the_cleared_progress_bar(capsys, onnx_file, tmp_path,
                                                                              monkeypatch):
    """A full disk while the backend writes: exit 2, one line naming the bundle, the progress bar's
    line cleared before it (tqdm draws with carriage returns), no temporary directory left."""
    from nnforge.backends.onnx import OnnxBackend

    def full(self, graph, target, out_dir):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(OnnxBackend, "lower", full)
    out = tmp_path / "b"
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--out", out)
    # the progress bar is drawn on a terminal only (and cleared there before the error line)
    assert rc == EXIT_BAD_INPUT
    assert err == f"nnforge: error: {out}: No space left on device; free some space or write somewhere else\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, line", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out.safetensors"),
     "/data/out.safetensors: Permission denied; check its permissions or use another path"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), "/data: Is a directory; it is a directory: give a file"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
], ids=["permission", "directory", "rename"])
def test_any_os_error_is_exit_2_and_one_line(capsys, monkeypatch, error, line):
    def fail(args):
        raise error
    monkeypatch.setattr("nnforge.cli.cmd_targets", fail)
    rc, _, err = run_cli(capsys, "targets")
    assert rc == EXIT_BAD_INPUT and err == f"nnforge: error: {line}\n"


def test_any_nnforge_error_is_exit_2_and_one_line(capsys, monkeypatch):
    """The CLI catches the root, not a list of classes: a stage's new error class needs no CLI edit."""
    class NewStageError(NnforgeError):          # neither a ValueError nor a RuntimeError
        pass

    def fail(args):
        raise NewStageError("layer fc1: no kernel for int3 weights; choose another recipe")
    monkeypatch.setattr("nnforge.cli.cmd_targets", fail)
    rc, out, err = run_cli(capsys, "targets")
    assert rc == EXIT_BAD_INPUT and out == ""
    assert err == "nnforge: error: layer fc1: no kernel for int3 weights; choose another recipe\n"


def test_a_bug_is_not_dressed_as_bad_input(monkeypatch):
    """A plain ValueError from nnforge's own code is a bug: it keeps its traceback."""
    def fail(args):
        raise ValueError("an invariant broke")
    monkeypatch.setattr("nnforge.cli.cmd_targets", fail)
    with pytest.raises(ValueError, match="an invariant broke"):
        main(["targets"])


def test_malformed_batch_sizes(capsys, onnx_file, tmp_path):
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--out", tmp_path / "b",
                         "--batch-sizes", "1,x")
    assert_one_error_line(rc, err, "--batch-sizes", "'1,x'")
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--out", tmp_path / "b",
                         "--batch-sizes", "0")
    assert_one_error_line(rc, err, "batch sizes must be positive integers, got [0]")
    assert not (tmp_path / "b").exists()


def test_ctrl_c_exits_130_without_a_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr("nnforge.cli.cmd_targets", interrupted)
    rc, out, err = run_cli(capsys, "targets")
    assert rc == 130 and err == "nnforge: interrupted\n" and out == ""


def test_run_takes_the_bundles_own_reference_inputs(capsys, cli_bundle):
    """The reference inputs are saved under the model's input names, so `run --inputs` reads them."""
    rc, out, _ = run_cli(capsys, "run", cli_bundle, "--inputs", cli_bundle / "reference" / "inputs.safetensors")
    assert rc == 0 and out.startswith("y: shape [3, 8]")


def test_inspect_says_unsigned_and_lists_layers_with_fidelity(capsys, onnx_file, tmp_path):
    out = tmp_path / "b"
    assert run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--recipe", "w8", "--out", out)[0] == 0
    rc, text, _ = run_cli(capsys, "inspect", out, "--layers")
    assert rc == 0
    assert "signature: unsigned: anyone could have edited manifest.json" in text
    import re
    assert re.search(r"weights: 3.2 KB -> 1.1 KB \(2.97x\); whole model \d+\.\d\d bits/weight; 2 of 2 weight layers "
                     r"compressed, at \d+\.\d\d bits/weight", text), text
    assert "on 1 held-out rows in 1 batch(es): the example inputs (no pass reads data)" in text
    header = next(line for line in text.splitlines() if line.strip().startswith("layer "))
    assert header.split() == ["layer", "op", "shape", "encoding", "bits/w", "w", "SQNR", "out", "SQNR", "out", "cos"]
    rows = [line for line in text.splitlines() if "i8 per-channel sym" in line]
    assert len(rows) == 2 and all(len(r.split()) >= 9 for r in rows)


def test_recipe_help_lists_presets_and_the_file_format(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--recipe", "help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert "w4-gptq" in text and "[[passes]]" in text and "quantize_rtn" in text and "block-sparse-<pct>" in text


def test_json_recipe_on_the_command_line(capsys, onnx_file, tmp_path):
    out = tmp_path / "b"
    recipe = '[{"pass": "quantize_rtn", "format": "int8", "layers": ["*_1"]}]'
    rc, text, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--recipe", recipe, "--out", out)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"]["name"] == "custom" and m["compression"]["compressed_layers"] == 1


def test_layer_pattern_typo_exits_2_naming_the_pattern(capsys, onnx_file, tmp_path):
    recipe = '[{"pass": "quantize_rtn", "format": "int8", "layers": ["*.atention.*"]}]'
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--recipe", recipe, "--out", tmp_path / "b")
    assert_one_error_line(rc, err, "layers pattern '*.atention.*' matches no linear/conv layer")


def test_dim_typo_exits_2_naming_the_dims(capsys, onnx_file, tmp_path):
    rc, _, err = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--dim", "bacth=4", "--out", tmp_path / "b")
    assert_one_error_line(rc, err, "no symbolic input dim named bacth; its symbolic dims: batch")


def test_compile_prints_the_passes_warnings_and_inspect_shows_them(capsys, onnx_file, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32))
    out = tmp_path / "w4"
    rc, stdout, _ = run_cli(capsys, "compile", onnx_file, "--target", "onnx", "--recipe", "w4-gptq",
                            "--calibration", calib, "--out", out)
    assert rc == 0
    warned = [line for line in stdout.splitlines() if line.startswith("  warning: quantize_gptq: the calibration set")]
    assert len(warned) == 1 and "calibration tokens per input column" in warned[0]
    m = json.loads((out / "manifest.json").read_text())
    (gptq,) = [r for r in m["passes"] if r["name"] == "quantize_gptq"]
    assert gptq["warnings"] == [warned[0].removeprefix("  warning: ")]
    rc, shown, _ = run_cli(capsys, "inspect", out)
    assert rc == 0 and warned[0] in shown.splitlines()


def test_an_unsupported_op_says_the_cli_takes_no_converters(capsys, tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"], axis=-1)], "hardmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    path = tmp_path / "hardmax.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    rc, _, err = run_cli(capsys, "compile", path, "--target", "onnx", "--out", tmp_path / "b")
    assert rc == EXIT_BAD_INPUT
    assert "1 unsupported op(s) (Hardmax)" in err and "Hardmax at node" in err
    assert ("The CLI cannot take converters (they are Python functions): compile from Python with "
            "nf.compile(..., converters={'Hardmax': fn})") in err
    assert not (tmp_path / "b").exists()
