"""atomic_file: a reader sees the old file or the complete new one, never a part of one."""

from __future__ import annotations

import os
import stat

import pytest

from vdvae_latents.core.atomic import atomic_file, save_figure, write_text
from vdvae_latents.core.errors import CheckpointError, UserError


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


class TestAtomicFile:
    def test_writes_the_file_and_leaves_no_temporary(self, tmp_path):
        target = tmp_path / "out.bin"
        with atomic_file(target, what="thing") as f:
            f.write(b"new")
        assert target.read_bytes() == b"new" and leftovers(tmp_path) == []

    @pytest.mark.parametrize("failure", [RuntimeError("writer bug"), KeyboardInterrupt()])
    def test_a_failed_writer_leaves_the_old_file_untouched(self, tmp_path, failure):
        target = tmp_path / "out.bin"
        target.write_bytes(b"old")
        with pytest.raises(type(failure)):
            with atomic_file(target, what="thing") as f:
                f.write(b"half of the new")
                raise failure
        assert target.read_bytes() == b"old" and leftovers(tmp_path) == []

    def test_the_temporary_is_hidden_beside_the_target(self, tmp_path):
        target = tmp_path / "out.bin"
        with atomic_file(target, what="thing"):
            (tmp,) = leftovers(tmp_path)
            assert tmp.startswith(".out.bin.") and not target.exists()

    def test_a_missing_folder_is_one_sentence_naming_the_path(self, tmp_path):
        target = tmp_path / "nowhere" / "out.bin"
        with pytest.raises(UserError, match=r"^cannot write thing .*nowhere/out\.bin \(.+\)\.$"):
            with atomic_file(target, what="thing") as f:
                f.write(b"x")

    def test_os_errors_become_the_callers_error_class(self, tmp_path):
        with pytest.raises(CheckpointError, match="cannot write checkpoint"):
            with atomic_file(tmp_path / "no" / "ckpt.pt", what="checkpoint", error=CheckpointError):
                pass

    def test_permissions_follow_the_umask_like_any_new_file(self, tmp_path):
        old = os.umask(0o022)
        try:
            write_text(tmp_path / "a.txt", "hello", what="text")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        assert (tmp_path / "a.txt").read_text() == "hello"


class TestSaveFigure:
    @pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), ("", b"\x89PNG")])
    def test_the_suffix_names_the_format(self, tmp_path, suffix, magic):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot([0, 1], [1, 0])
        path = save_figure(fig, tmp_path / f"fig{suffix}")
        assert path.read_bytes().startswith(magic) and leftovers(tmp_path) == []
