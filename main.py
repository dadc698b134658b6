"""Entry point: ``python main.py fit --config configs/quickstart.yaml`` (the same as the ``pretrain`` command)."""

from pretrain.commands.cli import main

if __name__ == "__main__":
    main()
