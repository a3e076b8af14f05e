"""``python -m gateway.simulator``: serve the simulated upstream until interrupted."""

from gateway.simulator.runner import main

main()
