"""`python -m diffusion_opd_trainer <command> ...`, and `accelerate launch -m diffusion_opd_trainer <command> ...`."""

from .cli import main


if __name__ == "__main__":
    raise SystemExit(main())
