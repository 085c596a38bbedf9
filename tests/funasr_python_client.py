"""Transcribe one WAV file with the funasr-python client (PyPI, module ``funasr_client``) and print what it
reports, one JSON object a line.

Run by tests/test_funasr_clients.py with the python of a virtual environment of its own (funasr-python
installs the same module name as the funasr-client package of the main venv):

    python tests/funasr_python_client.py ws://127.0.0.1:PORT/v1/funasr speech.wav 2pass

Lines printed: ``{"kind": "partial", "text": ...}`` for every result the client reports with
``is_final`` false (2pass-online and 2pass-offline alike: the client does not tell them apart),
``{"kind": "final", "text": ...}`` for the one with ``is_final`` true, ``{"kind": "error", ...}`` for an
error it reports, and last ``{"kind": "done", "text": ...}`` with what ``recognize_file`` returned. Exit
status 0 when recognize_file returned, 1 when it raised (the exception is printed as the last line).
"""

from __future__ import annotations

import asyncio
import json
import sys

from funasr_client import AsyncFunASRClient, AsyncRecognitionCallback, AudioFileStreamer


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class Printer(AsyncRecognitionCallback):
    """Prints every result the client hands to its callback."""

    async def on_partial_result(self, result: object) -> None:
        emit(kind="partial", text=getattr(result, "text", ""))

    async def on_final_result(self, result: object) -> None:
        emit(kind="final", text=getattr(result, "text", ""))

    async def on_sentence_end(self, result: object) -> None:
        emit(kind="sentence", text=getattr(result, "text", ""))

    async def on_error(self, error: object) -> None:
        emit(kind="error", error=str(error))

    async def on_connection_status(self, status: object) -> None:
        pass


async def main(url: str, wav: str, mode: str, timeout_s: float) -> int:
    # recognize_file connects and sends the first message before it loads the file with librosa, whose
    # first call (imports, numba compilation) can take longer than the server's no-audio timeout (10 s)
    # on a busy machine; loading it once first makes that step quick.
    AudioFileStreamer(wav).get_file_info()
    client = AsyncFunASRClient(server_url=url, mode=mode, timeout=timeout_s, log_level="WARNING")
    try:
        result = await client.recognize_file(wav, callback=Printer())
    except Exception as e:  # the test reads the line; the exit status says it failed
        emit(kind="exception", type=type(e).__name__, error=str(e))
        return 1
    finally:
        await client.close()
    emit(kind="done", text=result.text, is_final=result.is_final)
    return 0


if __name__ == "__main__":
    url, wav, mode = sys.argv[1:4]
    timeout_s = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
    sys.exit(asyncio.run(main(url, wav, mode, timeout_s)))
