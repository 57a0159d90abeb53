"""Container health check: exit 0 when the API's /health answers 200 on API_PORT, else 1.

Used by the Dockerfile's HEALTHCHECK (standard library HTTP; the port comes from the settings).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from config import load_settings  # noqa: E402
from error_handler import ConfigError  # noqa: E402


def main() -> int:
    try:
        port = load_settings().api_port
    except ConfigError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
