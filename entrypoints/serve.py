"""Local inference endpoint with SageMaker's container contract (GET /ping, POST /invocations, 8080).

    python -m entrypoints.serve --model-dir MODEL [--shadow-model-dir SHADOW] [--capture-dir D]

The same server is the container's `serve` command: `twotower_lit.serving.server:main`.
"""
from twotower_lit.serving.server import main

if __name__ == "__main__":
    main()
