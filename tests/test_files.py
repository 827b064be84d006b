"""Report files (JSON, Markdown, chart, the command line's JSON) are written through
pytest_kld.files: an exclusively created temporary in the target's directory, replaced
atomically; a planted link is never followed, a failed write leaves the old file and no debris."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest

from pytest_kld.files import write_text


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_new_file_old_content_replaced_and_mode_kept(tmp_path):
    target = tmp_path / "r.json"
    write_text(target, "one")
    assert target.read_text() == "one" and (target.stat().st_mode & 0o777) == 0o644
    os.chmod(target, 0o600)
    write_text(target, "two")
    assert target.read_text() == "two" and (target.stat().st_mode & 0o777) == 0o600
    write_text(target, "three", append=True)
    assert target.read_text() == "twothree"
    assert _listing(tmp_path) == ["r.json"]


@pytest.mark.parametrize("planted", ["old-predictable", "target-itself"])
def test_a_planted_symlink_is_never_followed(tmp_path, planted):
    victim = tmp_path / "victim"
    victim.write_text("secret")
    os.chmod(victim, 0o600)
    work = tmp_path / "work"
    work.mkdir()
    target = work / "r.json"
    if planted == "old-predictable":  # what the old writer opened: f"{path}.tmp-{pid}"
        os.symlink(victim, f"{target}.tmp-{os.getpid()}")
    else:
        os.symlink(victim, target)
    write_text(target, "report")
    assert victim.read_text() == "secret" and (victim.stat().st_mode & 0o777) == 0o600
    assert target.read_text() == "report" and not target.is_symlink()


def test_links_at_every_temporary_name_are_not_followed(tmp_path, monkeypatch):
    """Whatever name is drawn, a link planted there makes the exclusive create fail and another
    name is drawn: the victim is never written."""
    victim = tmp_path / "victim"
    victim.write_text("secret")
    names = iter(["aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr("pytest_kld.files.secrets.token_hex", lambda n: next(names))
    os.symlink(victim, tmp_path / ".r.json.aaaa.tmp")
    write_text(tmp_path / "r.json", "report")
    assert victim.read_text() == "secret" and (tmp_path / "r.json").read_text() == "report"
    assert not (tmp_path / ".r.json.bbbb.tmp").exists()


def test_read_only_directory_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "summary.md"
    target.write_text("old summary")

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("pytest_kld.files.os.open", refuse)
    with pytest.raises(OSError):
        write_text(target, "new", append=True)
    assert target.read_text() == "old summary" and _listing(tmp_path) == ["summary.md"]


def test_full_disk_leaves_the_old_file_whole_and_no_debris(tmp_path):
    """A real short write (RLIMIT_FSIZE in a child process): neither a truncated target nor a
    leftover temporary."""
    target = tmp_path / "summary.md"
    target.write_text("old summary")
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "from pytest_kld.files import write_text\n"
        "try:\n"
        f"    write_text({str(target)!r}, 'x' * 100000, append=True)\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "refused" in p.stdout, (p.stdout, p.stderr)
    assert target.read_text() == "old summary" and _listing(tmp_path) == ["summary.md"]
    assert resource.RLIMIT_FSIZE  # the limit exists on this platform
