"""`python -m polysense.cli ...` (e.g. under torchrun): the same entry point as `polysense`."""

from polysense.cli.main import main

main()
