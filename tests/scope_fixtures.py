"""What Daydream Scope's browser UI really sends: offer ``initialParameters`` and data-channel updates.

Taken from github.com/daydreamlive/scope at revision
68b0f9564c47d0e0bd380d2833defb76b17fc96d (v0.2.4 and one fix, 2026-04-30):

- ``frontend/src/pages/StreamPage.tsx`` (``handleStartStream``: the block that
  starts ``const initialParameters`` builds the dict, in this key order; the
  same function builds the ``pipeline/load`` items);
- ``frontend/src/lib/graphUtils.ts`` (``linearGraphFromSettings`` makes the
  perform-mode graph, ``stripUIFields`` drops layout before it is sent);
- ``frontend/src/hooks/useStreamState.ts`` (settings defaults, e.g.
  ``kvCacheAttentionBias`` 0.3, default pipeline ``longlive``) and
  ``frontend/src/data/pipelines.ts`` (default prompts per input mode);
- ``src/scope/core/pipelines/longlive/schema.py`` (LongLive's video-mode
  defaults: ``denoising_steps`` [1000, 750], ``noise_scale`` 0.7);
- ``frontend/src/hooks/useUnifiedWebRTC.ts`` (``sendOffer`` posts
  ``{sdp, type, initialParameters}``; ``sendParameterUpdate`` sends the update
  as JSON text on the ``"parameters"`` data channel, null/undefined values dropped).

Values are what the UI sends with its defaults untouched, camera as input
(``input_mode`` "video"), recording off, no output sinks, no reference images.
Each dict is a fresh copy per call, so a test may change its own.
"""

from __future__ import annotations

import copy
from typing import Any

SCOPE_REVISION = "68b0f9564c47d0e0bd380d2833defb76b17fc96d"


def _linear_graph(pipeline_id: str) -> dict[str, Any]:
    """``stripUIFields(linearGraphFromSettings(pipeline_id, [], []))``: camera → pipeline → output."""
    return {
        "nodes": [
            {"id": "input", "type": "source", "source_mode": "video"},
            {"id": pipeline_id, "type": "pipeline", "pipeline_id": pipeline_id},
            {"id": "output", "type": "sink"},
        ],
        "edges": [
            {"from": "input", "from_port": "video", "to_node": pipeline_id, "to_port": "video", "kind": "stream"},
            {"from": pipeline_id, "from_port": "video", "to_node": "output", "to_port": "video", "kind": "stream"},
        ],
    }


# Scope's stock stream against its own server: its default pipeline (LongLive,
# prompts, VACE-capable) in video mode. This server has no "longlive", so an
# offer carrying this runs SCOPE_DEFAULT_PIPELINE and ignores every other key.
_LONGLIVE_VIDEO = {
    "input_mode": "video",
    "prompts": [{"text": "A 3D animated scene. A **panda** sitting in the grass, looking around.", "weight": 100}],
    "prompt_interpolation_method": "linear",
    "denoising_step_list": [1000, 750],
    "manage_cache": True,
    "pipeline_ids": ["longlive"],
    "produces_video": True,
    "produces_audio": False,
    "vace_context_scale": 1.0,
    "vace_use_input_video": False,
    "vace_enabled": False,
    "noise_scale": 0.7,
    "noise_controller": True,
    "graph": _linear_graph("longlive"),
    "recording": False,
}

# Scope's UI pointed at THIS server, "blur" picked from pipelines/schemas and its
# radius set to 5 in the Settings panel. Our schemas say supports_prompts false,
# no cache/VACE support, so those keys are left out; produces_video/_audio come
# from pipeline/status; noise_* are sent in video mode whatever the pipeline; a
# runtime schema field (ui.is_load_param false) is merged in flat, after "recording".
_BLUR_AGAINST_THIS_SERVER = {
    "input_mode": "video",
    "pipeline_ids": ["blur"],
    "produces_video": True,
    "produces_audio": False,
    "noise_scale": 0.7,
    "noise_controller": True,
    "graph": _linear_graph("blur"),
    "recording": False,
    "radius": 5,
}

# The matching pipeline/load body (usePipeline.triggerLoad sends {pipelines: items}):
# load_params carry the resolution (512x512, Scope's fallback when a schema has no
# height/width) and the Settings panel's overrides.
_BLUR_LOAD_REQUEST = {
    "pipelines": [
        {"node_id": "blur", "pipeline_id": "blur", "load_params": {"height": 512, "width": 512, "radius": 5}},
    ],
}

# Data-channel messages (JSON text on the "parameters" channel):
# handlePlayPauseToggle → sendParameterUpdate({paused}).
_PAUSE_UPDATE = {"paused": True}
# handleLivePromptSubmit → the full prompt blend, with interpolation and steps.
_PROMPT_UPDATE = {
    "prompts": [{"text": "A 3D animated scene. A **panda** eating bamboo in the rain.", "weight": 100}],
    "prompt_interpolation_method": "linear",
    "denoising_step_list": [1000, 750],
}
# A runtime schema field changed while streaming → sendParameterUpdate({[key]: value}).
_SCHEMA_FIELD_UPDATE = {"radius": 7}


def scope_initial_parameters() -> dict[str, Any]:
    """Scope's default stream (LongLive, video mode): prompts, pipeline_ids, graph, recording…"""
    return copy.deepcopy(_LONGLIVE_VIDEO)


def scope_initial_parameters_for_blur() -> dict[str, Any]:
    """What Scope's UI sends this server after picking "blur" (radius 5) from its schemas."""
    return copy.deepcopy(_BLUR_AGAINST_THIS_SERVER)


def scope_load_request_for_blur() -> dict[str, Any]:
    return copy.deepcopy(_BLUR_LOAD_REQUEST)


def scope_pause_update() -> dict[str, Any]:
    return copy.deepcopy(_PAUSE_UPDATE)


def scope_prompt_update() -> dict[str, Any]:
    return copy.deepcopy(_PROMPT_UPDATE)


def scope_schema_field_update() -> dict[str, Any]:
    return copy.deepcopy(_SCHEMA_FIELD_UPDATE)
