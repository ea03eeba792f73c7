"""The demo models are checked, not only built once: a role folder deleted (or a file of it) after
the family was built is rebuilt by the next ensure_demo_models, with the bytes of the first build,
and the other roles are left alone (issue 16, item 9)."""
import hashlib
import shutil

from backend import demo
from backend.manager import ModelManager


def digests(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_deleted_role_folder_or_file_is_rebuilt_as_it_was(tmp_path):
    spec = demo.ensure_demo_models(tmp_path)
    base = tmp_path / f"{demo.demo_key('2.2')}-v{demo.DEMO_VERSION}"
    assert demo.missing_roles(base, "2.2") == []
    before = {role: digests(base / role) for role in spec.repos}
    prior_stamp = (base / "prior" / "model_index.json").stat().st_mtime_ns

    shutil.rmtree(spec.repos["decoder"])                                       # a whole role folder
    (base / "depth_estimator" / "model.safetensors").unlink()      # a model repo's weights
    (base / "inpaint" / "movq" / "config.json").write_text("")     # a component's config, emptied
    assert demo.missing_roles(base, "2.2") == ["decoder", "inpaint", "depth_estimator"]

    again = demo.ensure_demo_models(tmp_path)
    assert again.repos == spec.repos
    assert demo.missing_roles(base, "2.2") == []
    assert {role: digests(base / role) for role in spec.repos} == before
    assert (base / "prior" / "model_index.json").stat().st_mtime_ns == prior_stamp   # not rebuilt
    assert not list(base.glob("*.tmp"))

    manager = ModelManager()                                        # and the rebuilt decoder loads
    with manager.use(again.stage("text2img")) as unit:
        assert type(unit.pipeline("default")).__name__ == "KandinskyV22Pipeline"
    manager.unload()
