"""fetch.py without network: a mocked hub download and small archives built here."""
import io
import tarfile
import zipfile

import numpy as np
import pytest
from huggingface_hub import errors as hf_errors
from PIL import Image

from defectlab.data import fetch, sources
from defectlab.base.errors import DefectlabError


def _png_bytes(size=16, value=100):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _mvtec_files(product, prefix=""):
    """Relative path → bytes of a tiny MVTec AD product folder."""
    files = {f"{product}/train/good/000.png": _png_bytes(), f"{product}/test/good/000.png": _png_bytes()}
    for i in range(2):
        files[f"{product}/test/crack/{i:03d}.png"] = _png_bytes(value=30)
        files[f"{product}/ground_truth/crack/{i:03d}_mask.png"] = _png_bytes(value=255)
    return {prefix + k: v for k, v in files.items()}


def _tar(path, files, mode="w:gz", extra=None):
    with tarfile.open(path, mode) as tf:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        for info in extra or []:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


# ----------------------------------------------------------------------------- hub
def test_defectspectrum_downloads_one_product(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(**kw):
        calls.append(kw)
        base = tmp_path / "ds" / "DS-MVTec" / "hazelnut"
        for sub, name in (("image/crack", "000.png"), ("image/crack", "001.png"), ("image/good", "000.png"),
                          ("mask/crack", "000_mask.png"), ("rgb_mask/crack", "001_rgb_mask.png")):
            (base / sub).mkdir(parents=True, exist_ok=True)
            (base / sub / name).write_bytes(_png_bytes(value=255 if "mask" in sub else 90))
        return kw["local_dir"]

    monkeypatch.setattr(fetch, "snapshot_download", fake_snapshot_download)
    root = fetch.fetch_defectspectrum("hazelnut", tmp_path / "ds")
    assert root == tmp_path / "ds" / "DS-MVTec"
    (kw,) = calls
    assert kw["repo_id"] == "DefectSpectrum/Defect_Spectrum" and kw["repo_type"] == "dataset"
    assert kw["allow_patterns"] and all(p.startswith("DS-MVTec/hazelnut/") for p in kw["allow_patterns"])
    d = sources.load(sources.DataConfig(data=str(root), product="hazelnut", image_size=8))
    assert d.layout == "ds-mvtec" and d.classes == ["crack"] and len(d.good) == 1
    assert {s.mask.parent.parent.name for s in d.train + d.test} == {"mask", "rgb_mask"}


def test_defectspectrum_offline_is_one_clear_line(tmp_path, monkeypatch):
    def offline(**kw):
        raise hf_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")

    monkeypatch.setattr(fetch, "snapshot_download", offline)
    with pytest.raises(DefectlabError, match="offline") as err:
        fetch.fetch_defectspectrum("screw", tmp_path)
    assert "\n" not in str(err.value)


def test_defectspectrum_empty_download_and_unknown_product(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "snapshot_download", lambda **kw: kw["local_dir"])
    with pytest.raises(DefectlabError, match="no images"):
        fetch.fetch_defectspectrum("screw", tmp_path)
    with pytest.raises(DefectlabError, match="unknown DS-MVTec product 'bolt'.*hazelnut"):
        fetch.fetch_defectspectrum("bolt", tmp_path)


def test_run_dispatches(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "fetch_defectspectrum", lambda product, dest, revision=None: (product, dest, revision))
    assert fetch.run(fetch.FetchConfig(product="screw", dest=str(tmp_path), revision="abc")) == ("screw", tmp_path, "abc")
    with pytest.raises(DefectlabError, match="needs --archive"):
        fetch.run(fetch.FetchConfig(source="mvtec"))


# ----------------------------------------------------------------------------- archives
@pytest.mark.parametrize("suffix,mode", [("tar.gz", "w:gz"), ("tar.xz", "w:xz")])
def test_mvtec_archive_only_requested_product(tmp_path, suffix, mode):
    files = {**_mvtec_files("hazelnut"), **_mvtec_files("screw"), "license.txt": b"CC BY-NC-SA"}
    archive = _tar(tmp_path / f"mvtec.{suffix}", files, mode)
    root = fetch.fetch_mvtec(archive, tmp_path / "out", product="screw")
    assert root == tmp_path / "out"
    assert sources.detect_layout(root) == ("mvtec", ["screw"])
    assert not (root / "hazelnut").exists() and not list(root.glob(".extract-*"))
    d = sources.load(sources.DataConfig(data=str(root), product="screw", image_size=8))
    assert d.classes == ["crack"] and len(d.train) == len(d.test) == 1


def test_mvtec_zip_with_wrapper_folder(tmp_path):
    archive = tmp_path / "mvtec.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, payload in _mvtec_files("hazelnut", prefix="mvtec_anomaly_detection/").items():
            zf.writestr(name, payload)
    root = fetch.fetch_mvtec(archive, tmp_path / "out")
    assert sources.detect_layout(root) == ("mvtec", ["hazelnut"])


@pytest.mark.parametrize("evil", ["../escape.png", "/tmp/abs.png", "hazelnut/../../escape.png"])
def test_archive_members_escaping_destination_are_refused(tmp_path, evil):
    archive = _tar(tmp_path / "evil.tar.gz", {**_mvtec_files("hazelnut"), evil: b"boo"})
    with pytest.raises(DefectlabError, match="outside the destination"):
        fetch.fetch_mvtec(archive, tmp_path / "out" / "deep")
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "out" / "escape.png").exists()


def test_archive_links_are_refused(tmp_path):
    link = tarfile.TarInfo("hazelnut/train/good/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar(tmp_path / "link.tar.gz", _mvtec_files("hazelnut"), extra=[link])
    with pytest.raises(DefectlabError, match="links"):
        fetch.fetch_mvtec(archive, tmp_path / "out")


def test_archive_errors(tmp_path):
    with pytest.raises(DefectlabError, match="archive not found"):
        fetch.fetch_mvtec(tmp_path / "missing.tar.xz")
    (tmp_path / "x.rar").write_bytes(b"rar")
    with pytest.raises(DefectlabError, match="unsupported archive"):
        fetch.fetch_mvtec(tmp_path / "x.rar", tmp_path / "out")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DefectlabError, match="cannot read archive"):
        fetch.fetch_mvtec(tmp_path / "broken.tar.gz", tmp_path / "out")
    archive = _tar(tmp_path / "one.tar.gz", _mvtec_files("hazelnut"))
    with pytest.raises(DefectlabError, match="no folder 'screw'.*hazelnut"):
        fetch.fetch_mvtec(archive, tmp_path / "out", product="screw")


def test_refetch_never_deletes_what_it_did_not_write(tmp_path, capsys):
    """Fetching again into a product folder that holds files is refused without
    --force; with --force only the archive's files are replaced, the user's notes and extra class
    folder stay, and another product beside it is never touched."""
    from defectlab.app import cli

    archive = _tar(tmp_path / "mvtec.tar.gz", _mvtec_files("hazelnut"))
    root = fetch.fetch_mvtec(archive, tmp_path / "out")
    notes, extra = root / "hazelnut" / "notes.txt", root / "hazelnut" / "test" / "mine" / "000.png"
    extra.parent.mkdir()
    notes.write_text("my notes")
    extra.write_bytes(_png_bytes())
    (root / "hazelnut/test/crack/000.png").write_bytes(b"edited")
    code = cli.main(["data", "fetch", "mvtec", "--archive", str(archive), "--dest", str(root),
                     "--product", "hazelnut"])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and "hazelnut" in err and "Traceback" not in err
    assert notes.read_text() == "my notes" and (root / "hazelnut/test/crack/000.png").read_bytes() == b"edited"
    assert cli.main(["data", "fetch", "mvtec", "--archive", str(archive), "--dest", str(root),
                     "--product", "hazelnut", "--force"]) == 0
    assert notes.read_text() == "my notes" and extra.is_file()  # not from the archive: kept
    assert (root / "hazelnut/test/crack/000.png").read_bytes() == _png_bytes(value=30)  # the archive's file back
    other = _tar(tmp_path / "screw.tar.gz", _mvtec_files("screw"))
    fetch.fetch_mvtec(other, root)  # another product into the same root needs no --force
    assert sources.detect_layout(root) == ("mvtec", ["hazelnut", "screw"]) and notes.is_file()
    assert not list(root.glob(".extract-*"))


def test_disk_full_while_extracting_is_not_a_damaged_archive(tmp_path, monkeypatch):
    import errno

    archive = _tar(tmp_path / "mvtec.tar.gz", _mvtec_files("hazelnut"))

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(DefectlabError, match="disk full while writing .*out"):
        fetch.fetch_mvtec(archive, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # the temp folder is gone
