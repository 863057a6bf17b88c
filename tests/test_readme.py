"""The README's usage snippet runs as written (MODEL_DIR: a tiny pipeline saved to disk)."""
import os
import re

from diffusers import StableDiffusionPipeline

from tiny import make_sd_pipeline, sd_prompt_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_usage_snippet_runs(tmp_path, capsys, monkeypatch):
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = re.findall(r"```python\n(.*?)\n```", readme, re.S)[0]
    make_sd_pipeline().save_pretrained(tmp_path)
    # The tiny pipeline has no text encoder / safety checker to load: say so to from_pretrained.
    load = StableDiffusionPipeline.from_pretrained
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", lambda path: load(
        path, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False))
    names = dict(MODEL_DIR=str(tmp_path), **sd_prompt_kwargs())
    exec(compile(snippet, "README.md", "exec"), names)
    images = names["images"]
    assert len(images) == 1 and images[0].size == (32, 32)
    assert capsys.readouterr().out.strip() == str({"full": 25, "skip": 11, "reuse": 14})
    assert "_frkern_handle" not in names["pipe"].unet.__dict__
