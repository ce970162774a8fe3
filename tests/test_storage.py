"""Object storage in and out (``s3://`` through s3fs) against moto's S3 server on loopback,
never a real endpoint: the same outputs as a local run byte for byte, resume from the
manifest's parts, hostile records ignored, nothing partial at a final key, and the lines
that refuse what object storage does not do (a report or a sweep there)."""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pisa_cli.imaging.objects import filesystem
from tests.builders import noise_image, save_hard_cases
from tests.fakes import FakePipeline, run_on
from tests.helpers import not_ours

BUCKET = "pisa-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 on 127.0.0.1 (a free port), reached only through AWS_ENDPOINT_URL and
    dummy credentials in the environment, as a user's MinIO would be: nothing is passed
    to s3fs. Stopped at the end of the module."""
    pytest.importorskip("s3fs", reason="the storage extra is not installed (pisa-cli[storage])")
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto's buckets live in the process, not in the server: a module whose tests this
    # worker runs in two spells (pytest-xdist) starts its second server on the first's
    reset = f"http://{host}:{port}/moto-api/reset"
    urllib.request.urlopen(urllib.request.Request(reset, method="POST"), timeout=30).close()
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", str(nowhere))  # never the user's ~/.aws
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        patch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        filesystem.cache_clear()
        fs = filesystem("s3")
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            filesystem.cache_clear()
            server.stop()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """RGBA, 16-bit, grey, a corrupt file, an image over --max-pixels 3000, a non-image, a
    sub-folder and two names that collide."""
    folder = tmp_path_factory.mktemp("mixed")
    for index in range(3):
        noise_image(8 + index, 6, index).save(folder / f"p{index}.png")
    noise_image(7, 6, 4).save(folder / "p0.jpg")  # p0.png and p0.jpg: p0_png, p0_jpg
    save_hard_cases(folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    noise_image(6, 6, 11).save(folder / "sub" / "deep.png")
    return folder


def _upload(fs, folder: Path, prefix: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def _objects(fs, prefix: str) -> dict[str, bytes]:
    """Relative key -> bytes of every visible object under ``prefix``."""
    fs.invalidate_cache()
    keys = [key for key in fs.find(prefix) if "/." not in key]
    return {key[len(prefix) + 1 :]: fs.cat_file(key) for key in keys}


def _upscale(pipeline, source, out, weights, *extra):
    args = ["upscale", source, "-o", out, "--scale", "2", "--process-size", "16"]
    args += ["--max-pixels", "3000"]
    return run_on(pipeline, *args, *extra, *weights)


@pytest.fixture(scope="module")
def weights(tiny_base, pisa_pkl) -> list:
    return ["--base-model", tiny_base, "--weights", pisa_pkl]


def test_s3_to_s3_writes_what_a_local_run_writes_and_resumes(s3, mixed, tmp_path, weights):
    local = _upscale(FakePipeline(), mixed, tmp_path / "local", weights, "-r")
    _upload(s3, mixed, f"{BUCKET}/in")
    remote = _upscale(FakePipeline(), f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", weights, "-r")
    assert remote.exit_code == local.exit_code == 1, remote.output  # corrupt, huge, 16-bit
    out = tmp_path / "local"
    expected = {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in out.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    }
    assert _objects(s3, f"{BUCKET}/out") == expected
    assert {"p0_png.png", "p0_jpg.png", "alpha.png", "grey.png"} <= set(expected)
    summary = r"\d+ done, \d+ skipped, \d+ failed; 1 non-image files ignored"
    counts = re.search(summary, local.output)
    assert counts and counts[0] in remote.output, remote.output
    assert "huge.png: 64x64 is 4,096 pixels" in remote.output  # from the header
    assert f"s3://{BUCKET}/in/corrupt.png: not an image Pillow can read" in remote.output
    parts = s3.find(f"{BUCKET}/out/.pisa-manifest")
    assert len(parts) == 1 and parts[0].endswith("-c1.jsonl")  # single records gathered

    again = _upscale(FakePipeline(), f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", weights, "-r")
    done = int(counts[0].split()[0])
    assert f"0 done, {done} skipped" in again.output, again.output
    s3.rm_file(f"{BUCKET}/out/alpha.png")
    s3.pipe_file(f"{BUCKET}/out/grey.png", b"edited by someone")
    redo = _upscale(FakePipeline(), f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", weights, "-r")
    assert f"1 done, {done - 1} skipped" in redo.output, redo.output
    assert "grey.png exists and was changed after pisa wrote it: kept" in redo.output
    assert _objects(s3, f"{BUCKET}/out")["alpha.png"] == expected["alpha.png"]


def test_a_forged_record_outside_the_prefix_is_ignored_and_names_are_escaped(s3, mixed, weights):
    source = f"{BUCKET}/forged/in"
    s3.pipe_file(f"{source}/a.png", (mixed / "p1.png").read_bytes())
    s3.pipe_file(f"{source}/b\x1b[2J\u202ec.png", (mixed / "p2.png").read_bytes())  # hostile
    # a record claiming the input itself as an output of -o: it would hide it from discovery
    forged = {
        "output": "../in/a.png", "source": "x", "source_bytes": 1, "source_mtime_ns": 1,
        "settings_key": "0" * 16, "settings": {}, "output_bytes": 1, "output_mtime_ns": 0,
        "output_sha256": "0" * 64,
    }  # fmt: skip
    s3.pipe_file(f"{BUCKET}/forged/.pisa-manifest/x-0.jsonl", json.dumps(forged).encode())
    result = _upscale(FakePipeline(), f"s3://{BUCKET}/forged/in", f"s3://{BUCKET}/forged", weights)
    assert result.exit_code == 0, result.output
    assert "1 record ignored: its output is outside the folder" in result.output
    assert "2 done" in result.output
    assert s3.exists(f"{BUCKET}/forged/a.png")
    assert "\x1b" not in result.output and "\u202e" not in result.output  # escaped, as local
    assert "in/b\\x1b[2J\\u202ec.png -> s3://" in result.output


def test_a_failure_while_writing_leaves_no_object_at_the_final_key(s3, mixed, weights, monkeypatch):
    from pisa_cli.imaging import io

    s3.pipe_file(f"{BUCKET}/broken/in/a.png", (mixed / "p1.png").read_bytes())
    s3.pipe_file(f"{BUCKET}/broken/in/b.png", (mixed / "p2.png").read_bytes())
    encode = io._encode

    def half_then_fail(pixels, fmt, handle, write, notes):
        encode(pixels, fmt, handle, write, notes)
        if pixels.size[0] == 18:  # a.png (9x6 at x2): half its bytes written, then a failure
            handle.truncate(handle.tell() // 2)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_encode", half_then_fail)
    source, out = f"s3://{BUCKET}/broken/in", f"s3://{BUCKET}/broken/out"
    result = _upscale(FakePipeline(), source, out, weights)
    assert result.exit_code == 1, result.output
    assert "a.png: cannot write (No space left on device)" in result.output
    s3.invalidate_cache()
    assert not s3.exists(f"{BUCKET}/broken/out/a.png")  # nothing at the key, not half
    assert s3.exists(f"{BUCKET}/broken/out/b.png")  # the batch went on
    records = [json.loads(s3.cat_file(k)) for k in s3.find(f"{BUCKET}/broken/out/.pisa-manifest")]
    assert [r["output"] for r in records] == ["b.png"]  # no record of what was never put


@pytest.mark.parametrize(
    ("extra", "code", "line"),
    [
        (["--report", "s3://b/r.json"], 3, "--report s3://b/r.json: reports are written to local"),
        (["-o", "nowhere://b/out"], 3, "nowhere://: not a storage fsspec knows"),
        (["-o", "memory://b/out/../in"], 2, "memory://b/out/../in: '..' in an object's name"),
        (["-o", "file:///tmp/out"], 2, "file:///tmp/out: a local file needs no URL"),
    ],
)
def test_what_object_storage_does_not_do_is_refused_in_one_line(
    tmp_path, weights, extra, code, line
):
    noise_image(8, 6).save(tmp_path / "a.png")
    result = run_on(None, "upscale", tmp_path / "a.png", "-o", tmp_path / "out", *extra, *weights)
    assert result.exit_code == code and line in result.output, result.output


def test_pisa_sweep_refuses_object_storage_before_the_model(tmp_path, weights):
    noise_image(8, 6).save(tmp_path / "a.png")
    result = run_on(None, "sweep", tmp_path / "a.png", "-o", "s3://b/sweep", *weights)
    assert result.exit_code == 3, result.output
    assert "s3://b/sweep: pisa sweep reads and writes local files only" in result.output


def test_without_the_extra_a_url_says_how_to_install_it(s3, tmp_path, weights, monkeypatch):
    import fsspec  # noqa: F401

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    known = sys.modules["fsspec.registry"]._registry  # the class fsspec imported already
    monkeypatch.delitem(known, "s3", raising=False)
    filesystem.cache_clear()
    try:
        result = run_on(None, "upscale", "s3://b/in", "-o", tmp_path / "out", *weights)
    finally:
        filesystem.cache_clear()
    assert result.exit_code == 3, result.output
    assert "s3:// needs object storage support: pip install 'pisa-cli[storage]'" in result.output


def test_objects_in_and_a_local_folder_out_and_back(s3, mixed, tmp_path, weights):
    s3.pipe_file(f"{BUCKET}/both/in/a.png", (mixed / "alpha.png").read_bytes())
    down = _upscale(FakePipeline(), f"s3://{BUCKET}/both/in", tmp_path / "down", weights)
    assert down.exit_code == 0, down.output
    again = _upscale(FakePipeline(), f"s3://{BUCKET}/both/in", tmp_path / "down", weights)
    assert "0 done, 1 skipped" in again.output, again.output  # the local manifest knows it
    up = _upscale(FakePipeline(), tmp_path / "down", f"s3://{BUCKET}/both/up", weights)
    assert up.exit_code == 0, up.output
    _upscale(FakePipeline(), tmp_path / "down", tmp_path / "up", weights)
    assert s3.cat_file(f"{BUCKET}/both/up/a.png") == (tmp_path / "up" / "a.png").read_bytes()


def test_a_ray_worker_reads_and_puts_objects_itself(s3, mixed):
    """The worker class as Ray runs it (called on a batch of job rows, here without Ray):
    its rows name objects, and it reads, writes and records them itself."""
    from pisa_cli.batch.ray_worker import UpscaleWorker, job_rows, result_from_json
    from pisa_cli.imaging.discover import Job
    from pisa_cli.imaging.objects import ObjectPath
    from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

    for name in ("p1.png", "corrupt.png"):
        s3.pipe_file(f"{BUCKET}/worker/in/{name}", (mixed / name).read_bytes())
    url = ObjectPath.parse
    jobs = [Job(url(f"s3://{BUCKET}/worker/in/{n}"), url(f"s3://{BUCKET}/worker/out/{n}"))
            for n in ("p1.png", "corrupt.png")]  # fmt: skip
    pipeline = FakePipeline()
    worker = UpscaleWorker(
        ModelOptions(device="cpu"), UpscaleOptions(scale=2), BatchOptions(), {"a": 1},
        f"s3://{BUCKET}/worker/out", lambda model, options: pipeline,
    )  # fmt: skip
    rows = job_rows(jobs)
    returned = worker({name: [row[name] for row in rows] for name in ("index", "source", "output")})
    results = [result_from_json(j, t)[0] for j, t in zip(jobs, returned["result"], strict=True)]
    assert [r.status for r in results] == ["done", "failed"]
    s3.invalidate_cache()
    assert Image.open(s3.open(f"{BUCKET}/worker/out/p1.png")).size == (18, 12)
    (part,) = s3.find(f"{BUCKET}/worker/out/.pisa-manifest")  # its task's records, gathered
    assert json.loads(s3.cat_file(part))["settings"] == {"a": 1}


ON_RAY = """
import sys
from tests.fakes import FakePipeline, run_on
from tests.helpers import not_ours
result = run_on(FakePipeline(), "upscale", *sys.argv[1:], "--ray", "local")
print(result.output)
sys.exit(result.exit_code)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_read_and_put_objects_as_one_process_does(s3, mixed, weights):
    """s3 to s3 on a local Ray instance of its own (a fresh process: its workers inherit the
    endpoint and credentials of the environment, as a user's would): the outputs of one
    process byte for byte, every worker's records gathered into its own part."""
    import os
    import subprocess

    pytest.importorskip("ray", reason="the ray extra is not installed (pisa-cli[ray])")
    for name in ("p1.png", "alpha.png", "grey.png", "corrupt.png", "huge.png"):
        s3.pipe_file(f"{BUCKET}/ray/in/{name}", (mixed / name).read_bytes())
    source = f"s3://{BUCKET}/ray/in"
    args = ["--scale", "2", "--process-size", "16", "--max-pixels", "3000", *map(str, weights)]
    single = run_on(FakePipeline(), "upscale", source, "-o", f"s3://{BUCKET}/ray/one", *args)
    assert single.exit_code == 1, single.output  # the corrupt and the huge image
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=root, PISA_RAY_TIMEOUT="180")  # two busy cores
    command = [sys.executable, "-c", ON_RAY, source, "-o", f"s3://{BUCKET}/ray/out", *args]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "3 done, 0 skipped, 2 failed" in done.stdout, done.stdout
    assert not_ours(done.stdout + done.stderr) == [], done.stderr  # Ray's lines off
    assert _objects(s3, f"{BUCKET}/ray/out") == _objects(s3, f"{BUCKET}/ray/one")
    parts = s3.find(f"{BUCKET}/ray/out/.pisa-manifest")
    assert parts and all(re.search(r"-c\d+\.jsonl$", part) for part in parts), parts


def test_a_storage_error_is_said_as_one_not_as_a_corrupt_image(s3, mixed, monkeypatch):
    from pisa_cli.errors import ImageError
    from pisa_cli.imaging.io import read_picture
    from pisa_cli.imaging.objects import ObjectPath

    s3.pipe_file(f"{BUCKET}/lost/a.png", (mixed / "p1.png").read_bytes())
    image = ObjectPath.parse(f"s3://{BUCKET}/lost/a.png")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Could not connect to the endpoint URL")  # as botocore's

    monkeypatch.setattr(s3, "cat_file", unreachable)
    with pytest.raises(ImageError, match=r"lost/a.png: cannot read \(Could not connect"):
        read_picture(image)


@pytest.mark.parametrize(
    "args", [["in"], ["in", "-r"], ["in/**/*.png", "-r"], ["in/**/*.png"], ["in/s"]]
)
def test_prefixes_and_globs_follow_the_local_rules(tmp_path, weights, args):
    """The same jobs, names and summary as local folders (memory://, no server): hidden
    names, non-images, sub-prefixes with and without -r, ** patterns."""
    import fsspec

    fs, root = fsspec.filesystem("memory"), f"/{tmp_path.name}"
    for key in ("in/a.png", "in/s/b.png", "in/s/t/c.png", "in/.h/d.png", "in/x.txt"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        noise_image(8, 6).save(tmp_path / key, format="PNG")
        fs.pipe_file(f"{root}/{key}", (tmp_path / key).read_bytes())
    local = _upscale(FakePipeline(), tmp_path / args[0], tmp_path / "out", weights, *args[1:])
    remote = _upscale(FakePipeline(), f"memory://{root}/{args[0]}", f"memory://{root}/out",
                      weights, *args[1:])  # fmt: skip
    assert remote.exit_code == local.exit_code == 0, remote.output
    summary = local.output.splitlines()[-1].split(" in ")[0]
    assert remote.output.splitlines()[-1].startswith(summary), remote.output
    out = tmp_path / "out"
    written = {path.relative_to(out).as_posix() for path in out.rglob("*.png")}
    assert {key[len(root) + 5 :] for key in fs.find(f"{root}/out") if "/." not in key} == written


def test_an_output_prefix_that_cannot_be_written_stops_before_the_model(s3, mixed, weights):
    s3.pipe_file(f"{BUCKET}/probe/a.png", (mixed / "p1.png").read_bytes())
    result = _upscale(None, f"s3://{BUCKET}/probe/a.png", "s3://no-such-bucket/out", weights)
    assert result.exit_code == 1, result.output  # and no model loaded (None fails if asked)
    assert "s3://no-such-bucket/out: cannot write into the output prefix" in result.output
