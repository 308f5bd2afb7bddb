"""``nsiter verify``: end to end (subprocess) and every bad-input path (in process, same code)."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import nsiter
from nsiter import _verify_cli
from nsiter._cli_common import EXIT_OUTPUT
from nsiter.cli import _UsageError, main

import reference
from helpers import spd_with_condition


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The 27 x 27 image covariance as .npy, plus a small SPD matrix and data in several formats."""
    d = tmp_path_factory.mktemp("verify")
    X = nsiter.im2col(nsiter.data.sample_image(), 3)
    cov, _ = reference.covariance(X)
    cov = (cov + cov.T) / 2
    np.save(d / "cov27.npy", cov)
    rng = np.random.default_rng(11)
    small = spd_with_condition(6, 100.0, rng)
    np.save(d / "small.npy", small)
    data = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 5))
    np.savetxt(d / "data.csv", data, delimiter=",", header="a,b,c,d,e", comments="")
    return {"dir": d, "cov27": cov, "small": small, "data": data}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nsiter.cli", "verify", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _cli_to(sink, *args):
    """``nsiter ARGS`` with stdout on ``sink``: a path, "closed" (``>&-``) or "broken" (a pipe nobody reads)."""
    cmd = [sys.executable, "-m", "nsiter.cli", *map(str, args)]
    if sink == "closed":
        return subprocess.run(["sh", "-c", '"$@" >&-', "sh", *cmd], stderr=subprocess.PIPE, text=True, timeout=300)
    if sink == "broken":
        r, w = os.pipe()
        os.close(r)
        try:
            return subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)
        finally:
            os.close(w)
    with open(sink, "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, timeout=300)


def _run(capsys, *args):
    code = main(["verify", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_usage_error(capsys, match, *args):
    code, out, err = _run(capsys, *args)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("nsiter")
    assert __import__("re").search(match, lines[0]), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- end to end (subprocess)


def test_cli_image_covariance_passes_and_writes_the_plot(files, tmp_path):
    png = tmp_path / "residuals.png"
    r = _cli(files["dir"] / "cov27.npy", "--method", "coupled", "-m", "eigh", "--tol", "1e-6", "--plot", png)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "Whitening check of a 27 x 27 covariance (cov27.npy)" in r.stdout
    assert "coupled PASS, eigh PASS" in r.stdout and f"plot: {png}" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lam = np.linalg.eigvalsh(files["cov27"])
    assert f"condition number kappa = {lam[-1] / lam[0]:.3e}" in r.stdout


def test_cli_json_schema_and_exit_1_when_a_method_misses_tol(files):
    r = _cli(files["dir"] / "cov27.npy", "--json", "--tol", "1e-6")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("nsiter verify: FAIL:") and len(r.stderr.strip().splitlines()) == 1
    assert "uncoupled" in r.stderr
    d = json.loads(r.stdout)
    assert d["passed"] is False and d["failed"] == ["uncoupled"] and d["tol"] == 1e-6
    assert d["file"].endswith("cov27.npy") and d["from_data"] is False and d["plot"] is None
    assert set(d["methods"]) == {"coupled", "uncoupled", "eigh"}
    lam = np.linalg.eigvalsh(files["cov27"])
    assert d["n"] == 27 and d["dtype"] == "float64"
    assert d["eig_min"] == pytest.approx(lam[0], rel=1e-9) and d["eig_max"] == pytest.approx(lam[-1], rel=1e-12)
    assert d["floor"] == pytest.approx(lam[-1] / lam[0] * np.finfo(float).eps / 2, rel=1e-8)
    for m, md in d["methods"].items():
        assert len(md["residuals"]) == md["n_iter"]
        assert md["diverged"] is (m == "uncoupled")
    assert d["methods"]["coupled"]["final_residual"] < 1e-6


def test_cli_bad_input_is_one_line_without_traceback(files, tmp_path):
    r = _cli(tmp_path / "missing.npy")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"nsiter verify: file {str(tmp_path / 'missing.npy')!r} does not exist; "
                                "pass the path of a .npy, .npz or text/CSV file")
    r = _cli(files["dir"] / "data.csv")  # a samples x features CSV without --from-data
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "add --from-data" in r.stderr


# --------------------------------------------------------------------------- in process: formats


@pytest.mark.parametrize("delimiter", [",", ";", "\t", " "])
def test_text_files_with_each_delimiter_and_a_header(tmp_path, delimiter):
    rng = np.random.default_rng(12)
    A = rng.standard_normal((4, 4))
    path = tmp_path / "m.txt"
    body = "\n".join(delimiter.join(f"{v:.17g}" for v in row) for row in A)
    path.write_text(f"# a comment\nc0{delimiter}c1{delimiter}c2{delimiter}c3\n{body}\n")
    np.testing.assert_array_equal(_verify_cli.load_matrix(path), A)
    path.write_text(body + "\n")  # no header
    np.testing.assert_array_equal(_verify_cli.load_matrix(path), A)


def test_npz_single_array_and_key(tmp_path):
    A = np.eye(3) * 2.0
    np.savez(tmp_path / "one.npz", cov=A)
    np.testing.assert_array_equal(_verify_cli.load_matrix(tmp_path / "one.npz"), A)
    np.savez(tmp_path / "two.npz", cov=A, mean=np.zeros(3))
    np.testing.assert_array_equal(_verify_cli.load_matrix(tmp_path / "two.npz", key="cov"), A)
    # recognised by content, not by extension
    np.save(tmp_path / "renamed.npy", A)
    (tmp_path / "renamed.npy").rename(tmp_path / "renamed.dat")
    np.testing.assert_array_equal(_verify_cli.load_matrix(tmp_path / "renamed.dat"), A)


def test_text_report_numbers_match_float64_references(files, capsys):
    code, out, err = _run(capsys, files["dir"] / "small.npy", "--method", "coupled,eigh", "--n-iter", "30",
                          "--eps", "0.01")
    assert code == 0 and err == ""
    C = files["small"] + 0.01 * np.eye(6)
    lam = np.linalg.eigvalsh(C)
    assert f"min {lam[0]:.3e}, max {lam[-1]:.3e}" in out and "eps = 0.01" in out and "n_iter = 30" in out
    D_star = reference.inv_sqrtm(C)
    rep = nsiter.verify_whitening(files["small"], methods=("coupled", "eigh"), n_iter=30, eps=0.01)
    fwd = np.linalg.norm(rep["coupled"].D - D_star) / np.linalg.norm(D_star)
    assert f"{fwd:.2e}" in out


def test_from_data_forms_the_float64_covariance(files, capsys):
    code, out, err = _run(capsys, files["dir"] / "data.csv", "--from-data", "--json", "-m", "eigh")
    assert code == 0, err
    d = json.loads(out)
    cov, _ = reference.covariance(files["data"])
    lam = np.linalg.eigvalsh(cov)
    assert d["from_data"] is True and d["source"] == "data.csv --from-data" and d["n"] == 5
    assert d["eig_min"] == pytest.approx(lam[0], rel=1e-9) and d["eig_max"] == pytest.approx(lam[-1], rel=1e-12)
    np.testing.assert_allclose(_verify_cli.data_covariance(files["data"]), cov, rtol=1e-12, atol=1e-14)


def test_dtype_option_runs_in_float32(files, capsys):
    code, out, err = _run(capsys, files["dir"] / "small.npy", "--dtype", "float32", "-m", "coupled", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["dtype"] == "float32" and d["input_dtype"] == "float64"
    assert d["unit_roundoff"] == np.finfo(np.float32).eps / 2


def test_progress_lines_only_on_a_terminal(files, capsys, monkeypatch):
    monkeypatch.setattr(_verify_cli, "_PROGRESS_FLOPS", 0.0)
    code, out, err = _run(capsys, files["dir"] / "small.npy", "-m", "coupled")
    assert code == 0 and err == ""  # captured stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, err = _run(capsys, files["dir"] / "small.npy", "-m", "coupled", "-m", "eigh")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("nsiter verify: [1/3] eigh reference")
    assert "[2/3] coupled (50 iterations)" in lines[1] and "[3/3] eigh" in lines[2]
    assert "Whitening check" in out  # the report stays on stdout


def test_help_documents_tol_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--tol T applies to ||D_k D_k C - I||_F" in out and "LAST iterate" in out
    assert "1 a method missed --tol" in out and "2 bad input or usage" in out
    for m in nsiter.newton_schulz.METHODS:
        assert m in out


# --------------------------------------------------------------------------- in process: bad input


def test_missing_file_and_directory(tmp_path, capsys):
    _assert_usage_error(capsys, r"does not exist; pass the path", tmp_path / "nope.npy")
    _assert_usage_error(capsys, r"is a directory", tmp_path)


def test_garbage_files(tmp_path, capsys):
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02garbage" * 10)
    _assert_usage_error(capsys, r"binary file but not \.npy/\.npz; save the matrix with numpy.save",
                        tmp_path / "bin.dat")
    (tmp_path / "latin.txt").write_bytes(b"1 2\n\xe9\xe9 3\n")
    _assert_usage_error(capsys, r"not UTF-8 text", tmp_path / "latin.txt")
    (tmp_path / "words.txt").write_text("hello world\nfoo bar\n")
    _assert_usage_error(capsys, r"cannot parse .* as whitespace-separated numbers", tmp_path / "words.txt")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    _assert_usage_error(capsys, r"cannot parse .* as comma-separated numbers.*same number", tmp_path / "ragged.csv")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    _assert_usage_error(capsys, r"holds no numbers", tmp_path / "empty.txt")
    (tmp_path / "fake.npy").write_text("1 2\n3 4\n")
    _assert_usage_error(capsys, r"not a valid \.npy file \(wrong header\)", tmp_path / "fake.npy")
    good = tmp_path / "trunc.npy"
    np.save(good, np.eye(20))
    good.write_bytes(good.read_bytes()[:200])
    _assert_usage_error(capsys, r"cannot read .* as a \.npy file", good)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    _assert_usage_error(capsys, r"cannot read .* as an \.npz file", tmp_path / "bad.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _assert_usage_error(capsys, r"object \(pickled\) array", tmp_path / "obj.npy")


def test_npz_ambiguous_or_wrong_key(tmp_path, capsys):
    np.savez(tmp_path / "two.npz", cov=np.eye(3), mean=np.zeros(3))
    _assert_usage_error(capsys, r"holds 2 arrays \(cov, mean\); choose one with --key NAME", tmp_path / "two.npz")
    _assert_usage_error(capsys, r"no array 'C'; it holds: cov, mean", tmp_path / "two.npz", "--key", "C")
    np.savez(tmp_path / "none.npz")
    _assert_usage_error(capsys, r"holds no arrays", tmp_path / "none.npz")
    np.save(tmp_path / "one.npy", np.eye(3))
    _assert_usage_error(capsys, r"--key 'cov' applies to \.npz files", tmp_path / "one.npy", "--key", "cov")


def test_bad_shapes_and_values(tmp_path, capsys):
    cases = {
        "rect.npy": (np.ones((4, 3)), r"got a 4 x 3 matrix; if rows are samples .* add --from-data"),
        "vec.npy": (np.ones(9), r"got a 1-D array of 9 values"),
        "stack.npy": (np.ones((2, 3, 3)), r"got shape \(2, 3, 3\); verify checks one matrix"),
        "empty.npy": (np.ones((0, 0)), r"empty array"),
        "cplx.npy": (np.eye(2, dtype=complex), r"complex numbers"),
        "str.npy": (np.array([["a", "b"], ["c", "d"]]), r"non-numeric array"),
        "nan.npy": (np.array([[1.0, np.nan], [np.nan, 1.0]]), r"2 NaN/inf values \(first at row 0, column 1\)"),
        "asym.npy": (np.array([[2.0, 1.0], [0.0, 2.0]]), r"asym\.npy: expected symmetric matrices in C"),
        "indef.npy": (np.array([[1.0, 2.0], [2.0, 1.0]]), r"positive definite.*add a ridge, e\.g\. eps ="),
    }
    for name, (arr, match) in cases.items():
        np.save(tmp_path / name, arr)
        _assert_usage_error(capsys, match, tmp_path / name)
    np.save(tmp_path / "one_row.npy", np.ones((1, 4)))
    _assert_usage_error(capsys, r"at least 2 samples", tmp_path / "one_row.npy", "--from-data")
    np.save(tmp_path / "few.npy", np.random.default_rng(13).standard_normal((3, 6)))
    _assert_usage_error(capsys, r"covariance of the data\): expected C \+ eps\*I positive definite",
                        tmp_path / "few.npy", "--from-data")


def test_bad_options(files, tmp_path, capsys):
    f = files["dir"] / "small.npy"
    choices = ", ".join(nsiter.newton_schulz.METHODS)
    _assert_usage_error(capsys, rf"unknown method 'newton'; choose from: {choices} \(repeat", f, "-m", "newton")
    _assert_usage_error(capsys, r"--n-iter: expected a positive integer, got '0'", f, "--n-iter", "0")
    _assert_usage_error(capsys, r"--n-iter: expected a positive integer, got 'ten'", f, "--n-iter", "ten")
    _assert_usage_error(capsys, r"--eps: expected a finite number >= 0", f, "--eps", "-1")
    _assert_usage_error(capsys, r"--tol: expected a finite number > 0", f, "--tol", "nan")
    _assert_usage_error(capsys, r"--tol: expected a finite number > 0", f, "--tol", "0")
    _assert_usage_error(capsys, r"--dtype: invalid choice: 'float16'", f, "--dtype", "float16")
    _assert_usage_error(capsys, r"unknown image format 'xyz'", f, "--plot", tmp_path / "out.xyz")
    _assert_usage_error(capsys, r"directory .* does not exist", f, "--plot", tmp_path / "no" / "out.png")
    _assert_usage_error(capsys, r"unrecognized arguments: --bogus", f, "--bogus")
    _assert_usage_error(capsys, r"required: FILE")


def test_load_matrix_raises_the_usage_error_class(tmp_path):
    with pytest.raises(_UsageError, match="does not exist"):
        _verify_cli.load_matrix(tmp_path / "missing.csv")


# --------------------------------------------------------------------------- resources and output


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs a POSIX system")
def test_fifo_device_and_directory_are_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = _cli(fifo, timeout=60)  # opening a FIFO nobody writes to blocks forever: it must never be opened
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"nsiter verify: {str(fifo)!r} is a FIFO (named pipe), not a regular file; "
                                "pass the path of a .npy, .npz or text/CSV file")
    _assert_usage_error(capsys, r"'/dev/zero' is a character device, not a regular file; pass the path", "/dev/zero")
    _assert_usage_error(capsys, r"is a directory; pass the path of a \.npy", tmp_path)


def test_n_iter_above_its_bound_is_refused(files, capsys):
    bound = _verify_cli.MAX_N_ITER
    _assert_usage_error(capsys, rf"--n-iter: expected a positive integer, got '100000000' \(e.g. --n-iter 50; "
                        rf"at most {bound}: the iteration reaches its floor", files["dir"] / "small.npy",
                        "--n-iter", "100000000")
    assert _verify_cli._n_iter(str(bound)) == bound


def test_declared_array_size_is_checked_before_loading(files, tmp_path, capsys):
    header = {"descr": "<f8", "fortran_order": False, "shape": (20000, 20000)}
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)  # the header alone: loading it would allocate 3.2 GB
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("C.npy", npy.getvalue())
    declared = r"its header declares a 20000 x 20000 float64 array of 3200000000 bytes \(2\.98 GiB\), "
    _assert_usage_error(capsys, rf"cannot load array 'C' from .*huge\.npz': {declared}more than --max-bytes "
                        rf"{2 ** 30}; pass a larger --max-bytes", tmp_path / "huge.npz")
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
    _assert_usage_error(capsys, rf"cannot load .*huge\.npy' as a \.npy file: {declared}", tmp_path / "huge.npy")
    small = files["dir"] / "small.npy"  # 6 x 6 float64: 288 bytes
    assert _run(capsys, small, "-m", "eigh", "--max-bytes", "288")[0] == 0
    _assert_usage_error(capsys, r"6 x 6 float64 array of 288 bytes .* more than --max-bytes 287", small,
                        "--max-bytes", "287")
    size = (files["dir"] / "data.csv").stat().st_size
    _assert_usage_error(capsys, rf"cannot load .*data\.csv': a text file of {size} bytes .* more than --max-bytes 100",
                        files["dir"] / "data.csv", "--from-data", "--max-bytes", "100")
    _assert_usage_error(capsys, r"--max-bytes: expected a positive number of bytes, got '0'", small, "--max-bytes", "0")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("sink, args", [("/dev/full", ["info"]), ("/dev/full", ["--version"]),
                                        ("/dev/full", ["verify", "--help"]), ("/dev/full", ["verify", "SMALL", "--json"]),
                                        ("closed", ["info"]), ("closed", ["verify", "SMALL"])])
def test_closed_or_full_stdout_exits_4_with_one_line_on_stderr(files, sink, args):
    r = _cli_to(sink, *(files["dir"] / "small.npy" if a == "SMALL" else a for a in args))
    assert r.returncode == EXIT_OUTPUT == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert re.fullmatch(r"nsiter( info| verify)?: (cannot write to stdout: No space left on device|"
                        r"stdout is closed; redirect it to a file or to /dev/null instead)", lines[0]), lines[0]


def test_broken_pipe_stops_quietly_with_the_verdict(files):
    for args in (["info"], ["verify", files["dir"] / "small.npy", "-m", "coupled"]):
        r = _cli_to("broken", *args)  # `| head` that stopped reading: no error, no "Exception ignored"
        assert r.returncode == 0 and r.stderr == "", r.stderr


def test_text_with_a_bom_or_non_utf8_bytes_in_comments_is_read(tmp_path, capsys):
    A = np.random.default_rng(14).standard_normal((3, 3))
    body = "\n".join(",".join(f"{v:.17g}" for v in row) for row in A).encode()
    cases = {"bom.csv": b"\xef\xbb\xbf" + body, "bom_header.csv": b"\xef\xbb\xbfa,b,c\n" + body,
             "latin1_comments.csv": b"# caf\xe9\n" + body + b"  # \xff\xfe\n"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        np.testing.assert_array_equal(_verify_cli.load_matrix(tmp_path / name), A)
    (tmp_path / "latin1_data.csv").write_bytes(b"# caf\xe9\n1,2\n3,\xe9\n")
    _assert_usage_error(capsys, r"line 3 is not UTF-8 text \(other bytes may appear only in '#' comments\)",
                        tmp_path / "latin1_data.csv")
