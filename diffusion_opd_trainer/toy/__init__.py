"""
A procedural multi-task world and the small base model trained on it: the library's embedded default.

The world mirrors the three kinds of task of DiffusionOPD (GenEval-like composition, OCR-like text rendering, an
aesthetic-like preference) at 32x32 pixels, with a renderer, procedural rewards and fixed train/test prompt sets.
`load_pipeline()` returns a small `StableDiffusion3Pipeline` trained here on the world's images, offline.

```python
from diffusion_opd_trainer import toy

pipe = toy.load_pipeline()  # a StableDiffusion3Pipeline, 32x32 images
dataset = toy.prompts("compositional", "test")  # columns: prompt, task, category, metadata
reward = toy.reward_funcs()["compositional"]
scores = reward(prompts=list(dataset["prompt"]), images=toy.render(dataset), metadata=list(dataset["metadata"]))
```

See `docs/toy_world.md` for the world, the rewards and the base model's measured figures.
"""

from .model import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, load_pipeline
from .render import DEFAULT_RESOLUTION, render, render_spec
from .rewards import compositional_reward, preference_reward, reward_funcs, text_reward
from .world import TASKS, VOCABULARY, caption, parse_prompt, prompts, specs


__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "DEFAULT_RESOLUTION",
    "TASKS",
    "VOCABULARY",
    "caption",
    "compositional_reward",
    "load_pipeline",
    "parse_prompt",
    "preference_reward",
    "prompts",
    "reward_funcs",
    "render",
    "render_spec",
    "specs",
    "text_reward",
]
