"""MLflow tracking into a local SQLite store keeps its artifacts beside the store, wherever the process runs."""

from pathlib import Path


def test_artifacts_land_beside_a_local_store_not_in_the_working_folder(tmp_path, monkeypatch):
    from tasks.tracking import Run

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(elsewhere)
    note = tmp_path / "note.txt"
    note.write_text("kept\n")

    run = Run.start("artifact-location", experiment="tracking-test")
    run.log_artifact(note, "notes")
    run.end()

    assert list(elsewhere.iterdir()) == []
    logged = list((store / "mlartifacts").rglob("note.txt"))
    assert len(logged) == 1 and logged[0].read_text() == "kept\n"
    assert Path(logged[0]).parent.name == "notes"
