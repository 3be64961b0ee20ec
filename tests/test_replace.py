"""Replacing a model folder whole (tnlm.export.replace): what is carried over, and what a
save killed between its renames leaves for the next run to put back."""

from __future__ import annotations

import os

import pytest

from tests.common import dead_pid, killed_save
from tnlm.export.replace import recover_staged, replace_folder


def _write_model(folder):
    (folder / "mpo_config.json").write_text('{"new": true}')
    (folder / "config.json").write_text("{}")


def test_replace_carries_the_users_files_and_kept_model_files_and_leaves_no_journal(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mpo_config.json").write_text('{"old": true}')
    (out / "modules.json").write_text("[mine]")  # a model file, but the user's: kept
    (out / "README.md").write_text("old card")  # a model file: not carried
    (out / "notes.txt").write_text("mine")
    replace_folder(out, _write_model, keep=["modules.json"])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "modules.json", "mpo_config.json", "notes.txt"]
    assert (out / "modules.json").read_text() == "[mine]"
    assert (out / "mpo_config.json").read_text() == '{"new": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing staged left


def test_a_failed_move_puts_every_carried_entry_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "modules.json").write_text("[mine]")
    (out / "notes.txt").write_text("mine")
    real_rename = os.rename

    def rename(src, dst):
        if str(dst) == str(out.resolve()) and ".partial-" in str(src):  # the new folder
            raise OSError("busy")  # into place: refused
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="busy"):
        replace_folder(out, _write_model, keep=["modules.json"])
    monkeypatch.setattr(os, "rename", real_rename)
    assert sorted(p.name for p in out.iterdir()) == ["modules.json", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_save_killed_before_its_last_rename_gets_its_kept_model_files_back(tmp_path):
    """A save killed after moving the user's entries into the new folder and before that
    folder took the old one's place: the ``keep=`` entries (model file names, such as a
    user's own modules.json) were deleted with the partial folder, only the entries that
    are not a model's went back. The names moved are now listed in the partial folder
    before the first is moved, and every listed one goes back."""
    out, old, partial = killed_save(tmp_path, '{"old": true}')
    _write_model(partial)
    (partial / "modules.json").write_text("[mine]")  # moved: listed
    (partial / "notes.txt").write_text("mine")  # moved: listed
    (partial / "README.md").write_text("new card")  # the new model's: not listed
    (partial / ".tnlm-moved").write_text("modules.json\nnotes.txt\n")
    said = recover_staged(out)
    assert any("was put back" in s for s in said), said
    assert sorted(p.name for p in out.iterdir()) == ["modules.json", "mpo_config.json",
                                                     "notes.txt"]
    assert (out / "modules.json").read_text() == "[mine]"
    assert (out / "mpo_config.json").read_text() == '{"old": true}'
    assert not partial.exists() and not old.exists()


def test_no_writer_is_signalled_on_windows(monkeypatch):
    """Three twins tested a writer's process with ``os.kill(pid, 0)``; one
    (``save_graph_replacing``'s) did so on Windows too, where ``os.kill`` ends the
    process. One test now (``writer_running``), which on Windows counts every writer as
    running (nothing of it removed) and never signals."""
    from tnlm.export import staging

    pid = dead_pid()
    assert not staging.writer_running(pid)
    calls = []
    monkeypatch.setattr(staging.os, "kill", lambda *a: calls.append(a))
    monkeypatch.setattr(staging, "on_windows", lambda: True)
    assert staging.writer_running(pid) and calls == []


def test_every_dense_weight_name_is_an_earlier_models_file(tmp_path):
    """replace.py knew only ``model*.safetensors`` as a dense model's weights while
    folder.py knew ten names (``pytorch_model.bin``, shards, ...): one list now, so an
    earlier dense model's ``pytorch_model.bin`` is not carried into the new folder."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("pytorch_model.bin", "model-00001-of-00002.safetensors", "mine.bin"):
        (out / name).write_text("x")
    replace_folder(out, _write_model)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mine.bin",
                                                     "mpo_config.json"]


def test_a_killed_save_whose_folder_was_made_again_is_put_back_not_deleted(tmp_path,
                                                                           monkeypatch):
    """With ``out`` made again after the kill (``os.makedirs(out, exist_ok=True)`` before
    the next save), recovery took the new ``out`` for the new model and deleted both the
    earlier folder and the partial one with the user's moved files. A partial folder left
    means the new model never took the place: an empty ``out`` is replaced by the earlier
    folder; an ``out`` holding other files keeps both staged folders, named. On Windows
    nothing is touched and the staged folders are named."""
    out, old, partial = killed_save(tmp_path, '{"old": true}')
    (partial / "notes.txt").write_text("mine")
    (partial / ".tnlm-moved").write_text("notes.txt\n")
    out.mkdir()
    said = recover_staged(out)
    assert any("was put back" in s for s in said), said
    assert sorted(p.name for p in out.iterdir()) == ["mpo_config.json", "notes.txt"]
    # out holds other files since: nothing deleted
    (tmp_path / "b").mkdir()
    out2, old2, partial2 = killed_save(tmp_path / "b")
    (partial2 / "notes.txt").write_text("mine")
    out2.mkdir()
    (out2 / "new.txt").write_text("made since")
    said = recover_staged(out2)
    assert any("move back what you need by hand" in s for s in said), said
    assert old2.is_dir() and (partial2 / "notes.txt").is_file()
    assert (out2 / "new.txt").is_file()
    from tnlm.export import replace

    monkeypatch.setattr(replace, "on_windows", lambda: True)
    said = recover_staged(out2)
    assert len(said) == 2 and all("by hand" in s for s in said), said
    assert old2.is_dir() and partial2.is_dir()
