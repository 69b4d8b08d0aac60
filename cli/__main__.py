"""``python -m p2pnode.cli`` runs the p2pnode command."""

from p2pnode.cli.main import main

main()
