"""``python -m devtools.simulator``: serve the simulated upstream until interrupted."""

from devtools.simulator.runner import main

main()
