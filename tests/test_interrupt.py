"""A Stop takes effect inside a model call (between its blocks), not only between steps."""
import numpy as np
import pytest

from backend import demo, interrupt, pipelines


class Stop(Exception):
    pass


def stop_after(n: int):
    calls = []

    def checker():
        calls.append(1)
        if len(calls) >= n:
            raise Stop
    return checker, calls


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return demo.ensure_demo_catalogue(tmp_path_factory.getbasetemp() / "demo-models")


@pytest.mark.parametrize("family,pipeline,kwargs", [
    ("kandinsky-2-2-demo", "KandinskyV22Pipeline", {"image_embeds": np.ones((1, 32), np.float32),
                                                    "negative_image_embeds": np.zeros((1, 32), np.float32)}),
    ("kandinsky-3-demo", "Kandinsky3Pipeline", {"prompt": "a red cat"}),
])
def test_the_unet_stops_between_its_blocks_before_the_step_ends(catalogue, family, pipeline, kwargs):
    pipe = getattr(pipelines, pipeline).from_pretrained(catalogue[family].repos["decoder"])
    steps = []
    checker, calls = stop_after(3)
    with interrupt.checking(checker), pytest.raises(Stop):
        pipe(**kwargs, height=64, width=64, num_inference_steps=3, generator=np.random.default_rng(0),
             callback=lambda *args: steps.append(args[0]))
    assert steps == [] and len(calls) >= 3    # stopped inside the first UNet call (batch 2: both halves)
    # outside a job nothing is checked, and the same pipeline runs to the end
    assert len(pipe(**kwargs, height=64, width=64, num_inference_steps=2, generator=np.random.default_rng(0),
                    output_type="np")[0]) == 1


def test_a_movq_decode_stops_between_its_resnets(catalogue):
    pipe = pipelines.KandinskyV22Pipeline.from_pretrained(catalogue["kandinsky-2-2-demo"].repos["decoder"])
    checker, calls = stop_after(2)
    with interrupt.checking(checker), pytest.raises(Stop):
        pipe.decode(np.zeros((1, 4, 16, 16), np.float32), "np")
    assert len(calls) == 2
    assert interrupt._checker is None           # the checker is gone after the block


def test_checkers_nest_and_restore():
    seen = []
    with interrupt.checking(lambda: seen.append("outer")):
        with interrupt.checking(lambda: seen.append("inner")):
            interrupt.check()
        interrupt.check()
    interrupt.check()
    assert seen == ["inner", "outer"]
