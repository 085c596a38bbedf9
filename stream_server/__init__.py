"""stream_server: a self-hosted, real-time speech transcription server over WebSockets.

Where things live (see README "Architecture"):

- ``protocol``  - the wire format: query options, client messages, server events. No I/O.
- ``audio``     - decoding client audio to 16 kHz mono float32 (linear16, mu-law, A-law, resampling).
- ``vad``       - frame classifiers (webrtcvad, FunASR FSMN-VAD).
- ``segmenter`` - the incremental endpointing state machine, fed one frame at a time.
- ``session``   - the sans-I/O heart, one object per stream.
- ``engines``   - the model behind one small synchronous interface (SenseVoice Small, faster-whisper).
- ``batcher``   - one worker thread that batches requests from all sessions onto the engine.
- ``transport`` - the only module that touches sockets (aiohttp).
"""

from __future__ import annotations

__version__ = "0.1.0"
