"""What differs between the Python versions this package runs on (3.10 and later: pyproject's classifiers,
each tested by ``scripts/test.sh``).

- :func:`timeout` is ``asyncio.timeout`` (new in 3.11); on 3.10, async-timeout's, the same context
  manager.
- ``asyncio.TimeoutError`` is the builtin ``TimeoutError`` only from 3.11: on 3.10 ``asyncio.wait_for``
  and :func:`timeout` raise an exception that ``except TimeoutError`` does not catch. Catch
  ``asyncio.TimeoutError``: that works on every version.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # Python 3.10
    from async_timeout import timeout

__all__ = ["timeout"]
