// The streaming page: camera → signaling socket → peer connection → processed video.
// It speaks only the public protocol: /ws/webrtc/, /api/v1/pipelines/ and
// /api/v1/webrtc/ice-servers/.
"use strict";

(() => {
  const NEGOTIATION_TIMEOUT_MS = 15000;
  const ICE_GATHERING_TIMEOUT_MS = 2000;
  // The server's `error` names why it closed the peer; give it a moment to
  // arrive before calling a closed transport a lost connection.
  const PEER_GONE_GRACE_MS = 750;
  // After the page closes its socket, the server closes the peer (the session
  // then ends CLIENT_DISCONNECT, not PEER_FAILED); the page's own close is the fallback.
  const PEER_CLOSE_WAIT_MS = 1000;
  const PARAMETER_SEND_INTERVAL_MS = 100;
  const STATS_INTERVAL_MS = 1000;

  // Codes that end a session (the close reasons, and refusals before one exists).
  const ENDING_CODES = new Set([
    "CLIENT_DISCONNECT", "MAX_DURATION_EXCEEDED", "SESSION_TERMINATED", "PEER_CLOSED", "PEER_FAILED", "WORKER_LOST",
    "SERVER_SHUTDOWN", "IDLE_TIMEOUT", "SIGNALING_LOST", "ERROR", "UNAUTHORIZED", "NO_CAPACITY", "INVALID_SDP",
  ]);
  const SOCKET_CLOSE_WORDS = {
    4003: "Log in to stream.",
    4008: "Time limit reached.",
    4009: "Session ended by an operator.",
    4011: "Lost connection to the media server.",
    4012: "The server is restarting; start again in a moment.",
    4013: "Nothing arrived from your side for too long (no offer, or no video).",
    4500: "Something went wrong on the server, so the session was ended.",
    4503: "Too many people are waiting for the server; try again later.",
    1012: "Lost connection to the server.",
  };

  const $ = (id) => document.getElementById(id);
  const root = $("stream");
  const maxSessionMs = Number(root.dataset.maxSeconds) * 1000;
  const ui = {
    camera: $("camera"), cameraEmpty: $("camera-empty"), output: $("output"), outputEmpty: $("output-empty"),
    state: $("state"), timeLeft: $("time-left"), endedReason: $("ended-reason"), notice: $("notice"),
    pipeline: $("pipeline"), parameters: $("parameters"), start: $("start"), stop: $("stop"),
    fpsIn: $("fps-in"), fpsOut: $("fps-out"), rtt: $("rtt"), pipelinePill: $("pipeline-pill"),
  };

  // What the page is doing, readable from outside (tests, the devtools console).
  const status = { state: "idle", sessionId: null, endedCode: null, outputFrames: 0 };
  window.scopeStream = status;

  let pipelines = [];
  const values = {}; // pipeline name → {parameter: value}
  let cameraStream = null;
  let current = null;

  // --- small helpers -----------------------------------------------------------

  function setState(state, label) {
    status.state = state;
    ui.state.dataset.state = state;
    ui.state.textContent = label;
  }

  function showNotice(text) {
    ui.notice.textContent = text;
    ui.notice.hidden = !text;
  }

  function formatClock(ms) {
    const total = Math.max(0, Math.ceil(ms / 1000));
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const seconds = String(total % 60).padStart(2, "0");
    return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${seconds}` : `${minutes}:${seconds}`;
  }

  function countOutputFrames() {
    // requestVideoFrameCallback fires once per frame actually presented.
    const video = ui.output;
    if (!("requestVideoFrameCallback" in video)) return;
    const onFrame = () => {
      if (!video.srcObject) return;
      status.outputFrames += 1;
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  // --- pipelines and their controls ---------------------------------------------

  function selectedPipeline() {
    return pipelines.find((p) => p.name === ui.pipeline.value);
  }

  function currentParameters() {
    return { pipeline: ui.pipeline.value, ...values[ui.pipeline.value] };
  }

  function renderControls() {
    const pipeline = selectedPipeline();
    ui.parameters.replaceChildren();
    ui.pipelinePill.textContent = pipeline ? pipeline.label : "";
    if (!pipeline) return;
    for (const spec of pipeline.parameters) {
      ui.parameters.append(controlFor(pipeline.name, spec));
    }
  }

  function controlFor(pipelineName, spec) {
    const label = document.createElement("label");
    label.className = "field";
    const caption = document.createElement("span");
    caption.textContent = spec.label || spec.name;
    const value = values[pipelineName][spec.name];
    let input;
    if (spec.kind === "bool") {
      label.classList.add("toggle");
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(value);
      input.addEventListener("change", () => changeParameter(spec.name, input.checked));
      label.append(input, caption);
    } else if (spec.kind === "choice") {
      input = document.createElement("select");
      for (const choice of spec.choices) input.add(new Option(choice, choice, false, choice === value));
      input.addEventListener("change", () => changeParameter(spec.name, input.value));
      label.append(caption, input);
    } else {
      input = document.createElement("input");
      input.type = "range";
      input.min = spec.minimum ?? 0;
      input.max = spec.maximum ?? 100;
      input.step = spec.kind === "int" ? 1 : (Number(input.max) - Number(input.min)) / 100;
      input.value = value;
      const shown = document.createElement("output");
      shown.className = "value";
      shown.textContent = value;
      caption.append(shown);
      input.addEventListener("input", () => {
        const parsed = spec.kind === "int" ? parseInt(input.value, 10) : Number(Number(input.value).toFixed(3));
        shown.textContent = parsed;
        changeParameter(spec.name, parsed);
      });
      label.append(caption, input);
    }
    input.name = spec.name;
    input.dataset.parameter = spec.name;
    return label;
  }

  function changeParameter(name, value) {
    values[ui.pipeline.value][name] = value;
    current?.sendParameters(currentParameters());
  }

  async function loadPipelines() {
    const response = await fetch("/api/v1/pipelines/", { credentials: "same-origin" });
    if (!response.ok) throw new Error(`pipelines: HTTP ${response.status}`);
    pipelines = await response.json();
    for (const pipeline of pipelines) {
      values[pipeline.name] = Object.fromEntries(pipeline.parameters.map((spec) => [spec.name, spec.default]));
      ui.pipeline.add(new Option(pipeline.label, pipeline.name, pipeline.default, pipeline.default));
    }
    ui.pipeline.disabled = false;
    renderControls();
  }

  ui.pipeline.addEventListener("change", () => {
    renderControls();
    current?.sendParameters(currentParameters());
  });

  // --- one streaming session ------------------------------------------------------

  class StreamingSession {
    constructor() {
      this.ws = null;
      this.pc = null;
      this.channel = null;
      this.sessionId = null;
      this.ended = false;
      this.timers = new Set();
      this.intervals = new Set();
      this.pendingCandidates = [];
      this.deadline = null;
      this.lastStats = null;
      this.parameterTimer = null;
      this.queuedParameters = null;
    }

    later(ms, fn) {
      const timer = setTimeout(() => { this.timers.delete(timer); fn(); }, ms);
      this.timers.add(timer);
      return timer;
    }

    every(ms, fn) {
      const interval = setInterval(fn, ms);
      this.intervals.add(interval);
    }

    open() {
      setState("connecting", "Connecting…");
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      this.ws = new WebSocket(`${scheme}://${location.host}/ws/webrtc/`);
      this.ws.addEventListener("message", (event) => this.onMessage(event));
      this.ws.addEventListener("close", (event) => this.onSocketClosed(event));
    }

    send(message) {
      if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
    }

    onMessage(event) {
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      switch (message.type) {
        case "queued":
          setState("queued", `Queued · position ${message.position}`);
          break;
        case "ready":
          this.negotiate().catch((error) => this.end(`Could not start the video connection: ${error.message}`, "CLIENT_ERROR"));
          break;
        case "answer":
          this.onAnswer(message).catch((error) => this.end(`Could not start the video connection: ${error.message}`, "CLIENT_ERROR"));
          break;
        case "error":
          this.onError(message);
          break;
        default:
          break; // acks and pongs need nothing
      }
    }

    async negotiate() {
      setState("connecting", "Connecting…");
      this.later(NEGOTIATION_TIMEOUT_MS, () => {
        if (status.state !== "live") this.end("The media server did not connect in time.", "TIMEOUT");
      });
      const response = await fetch("/api/v1/webrtc/ice-servers/", { credentials: "same-origin" });
      const { iceServers } = response.ok ? await response.json() : { iceServers: [] };
      if (this.ended) return;
      const pc = new RTCPeerConnection({ iceServers });
      this.pc = pc;
      for (const track of cameraStream.getVideoTracks()) pc.addTransceiver(track, { direction: "sendrecv", streams: [cameraStream] });
      this.channel = pc.createDataChannel("parameters");
      this.channel.addEventListener("message", (event) => this.onChannelMessage(event));
      pc.addEventListener("track", (event) => this.showOutput(event));
      pc.addEventListener("icecandidate", (event) => this.onLocalCandidate(event.candidate));
      pc.addEventListener("connectionstatechange", () => {
        if (pc.connectionState === "connected") this.onLive();
        else if (pc.connectionState === "failed") this.peerGone();
      });
      await pc.setLocalDescription(await pc.createOffer());
      await this.gatheringDone(pc);
      if (this.ended) return;
      this.offerSentAt = Date.now();
      this.send({ type: "offer", sdp: pc.localDescription.sdp, sdp_type: "offer", initialParameters: currentParameters() });
    }

    gatheringDone(pc) {
      // Sending every candidate in the offer saves round trips; ones found later are trickled.
      if (pc.iceGatheringState === "complete") return Promise.resolve();
      return new Promise((resolve) => {
        const timer = this.later(ICE_GATHERING_TIMEOUT_MS, resolve);
        pc.addEventListener("icegatheringstatechange", () => {
          if (pc.iceGatheringState === "complete") { clearTimeout(timer); this.timers.delete(timer); resolve(); }
        });
      });
    }

    onLocalCandidate(candidate) {
      if (!this.offerSentAt) return; // still in the offer's SDP
      const payload = candidate ? candidate.toJSON() : null;
      if (this.sessionId) this.send({ type: "icecandidate", candidate: payload, sessionId: this.sessionId });
      else this.pendingCandidates.push(payload);
    }

    async onAnswer(message) {
      this.sessionId = message.sessionId;
      status.sessionId = message.sessionId;
      this.deadline = this.offerSentAt + maxSessionMs;
      await this.pc.setRemoteDescription({ type: message.sdp_type, sdp: message.sdp });
      for (const candidate of this.pendingCandidates.splice(0)) {
        this.send({ type: "icecandidate", candidate, sessionId: this.sessionId });
      }
      // The DTLS transport closes within milliseconds of the server closing the peer;
      // connectionState would take seconds.
      const transport = this.pc.getTransceivers()[0]?.receiver.transport;
      transport?.addEventListener("statechange", () => {
        if (transport.state === "closed" || transport.state === "failed") this.peerGone();
      });
    }

    showOutput(event) {
      if (this.ended) return;
      ui.output.srcObject = event.streams[0] || new MediaStream([event.track]);
      ui.outputEmpty.hidden = true;
      countOutputFrames();
    }

    onLive() {
      if (this.ended || status.state === "live") return;
      setState("live", "Live");
      ui.timeLeft.hidden = false;
      const tick = () => { ui.timeLeft.textContent = `${formatClock(this.deadline - Date.now())} left`; };
      tick();
      this.every(1000, tick);
      this.every(STATS_INTERVAL_MS, () => this.updateStats());
    }

    async updateStats() {
      if (!this.pc || this.ended) return;
      const report = await this.pc.getStats();
      const now = { at: performance.now(), sent: 0, received: 0, rtt: null };
      report.forEach((stat) => {
        if (stat.type === "outbound-rtp" && stat.kind === "video") now.sent += stat.framesEncoded || 0;
        if (stat.type === "inbound-rtp" && stat.kind === "video") now.received += stat.framesDecoded || 0;
        if (stat.type === "candidate-pair" && stat.nominated && stat.currentRoundTripTime !== undefined) {
          now.rtt = stat.currentRoundTripTime;
        }
      });
      const before = this.lastStats;
      this.lastStats = now;
      if (!before || this.ended) return;
      const seconds = (now.at - before.at) / 1000;
      ui.fpsIn.textContent = `${((now.sent - before.sent) / seconds).toFixed(0)} fps`;
      ui.fpsOut.textContent = `${((now.received - before.received) / seconds).toFixed(0)} fps`;
      ui.rtt.textContent = now.rtt === null ? "–" : `${(now.rtt * 1000).toFixed(0)} ms`;
    }

    sendParameters(parameters) {
      // Live changes go over the data channel, at most one per interval; the last one always goes.
      this.queuedParameters = parameters;
      if (this.parameterTimer) return;
      const flush = () => {
        this.parameterTimer = null;
        const update = this.queuedParameters;
        this.queuedParameters = null;
        if (!update || this.ended) return;
        if (this.channel?.readyState === "open") this.channel.send(JSON.stringify(update));
        else if (this.sessionId) this.send({ type: "parameters", sessionId: this.sessionId, ...update });
        else return; // not negotiated yet: the offer will carry the current values
        this.parameterTimer = this.later(PARAMETER_SEND_INTERVAL_MS, flush);
      };
      flush();
    }

    onChannelMessage(event) {
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      // The server says why it ends the stream here too, just before it closes the peer.
      if (message.type === "stream_stopped") this.end(message.error_message, message.reason);
      else if (message.type === "error") showNotice(message.error);
      else if (message.type === "parameters_ack") showNotice("");
    }

    onError(message) {
      const aboutThisSession = !message.sessionId || message.sessionId === this.sessionId;
      if (aboutThisSession && ENDING_CODES.has(message.code)) this.end(message.error, message.code);
      else showNotice(message.error);
    }

    peerGone() {
      if (this.ended) return;
      this.later(PEER_GONE_GRACE_MS, () => this.end("Lost connection to the media server.", "PEER_GONE"));
    }

    onSocketClosed(event) {
      if (this.ended) return;
      this.end(SOCKET_CLOSE_WORDS[event.code] || "Lost connection to the server.", `SOCKET_${event.code}`);
    }

    closePeer() {
      const pc = this.pc;
      if (!pc) return;
      const transport = pc.getTransceivers()[0]?.receiver.transport;
      const done = () => !transport || transport.state === "closed" || transport.state === "failed";
      if (done()) { pc.close(); return; }
      const fallback = setTimeout(() => pc.close(), PEER_CLOSE_WAIT_MS);
      transport.addEventListener("statechange", () => {
        if (done()) { clearTimeout(fallback); pc.close(); }
      });
    }

    stop() {
      this.end("You stopped the session.", "STOPPED");
    }

    end(text, code) {
      if (this.ended) return;
      this.ended = true;
      for (const timer of this.timers) clearTimeout(timer);
      for (const interval of this.intervals) clearInterval(interval);
      this.timers.clear();
      this.intervals.clear();
      // Closing the socket is what ends the session on the server (CLIENT_DISCONNECT).
      if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
      this.closePeer();
      ui.output.pause();
      ui.output.srcObject = null;
      ui.outputEmpty.textContent = "Session ended";
      ui.outputEmpty.hidden = false;
      ui.timeLeft.hidden = true;
      ui.fpsIn.textContent = ui.fpsOut.textContent = ui.rtt.textContent = "–";
      ui.endedReason.textContent = text;
      ui.endedReason.hidden = false;
      status.endedCode = code;
      setState("ended", "Ended");
      ui.start.disabled = false;
      ui.stop.disabled = true;
    }
  }

  // --- buttons ---------------------------------------------------------------------

  async function ensureCamera() {
    if (cameraStream) return;
    cameraStream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
    });
    ui.camera.srcObject = cameraStream;
    ui.cameraEmpty.hidden = true;
  }

  ui.start.addEventListener("click", async () => {
    ui.start.disabled = true;
    showNotice("");
    ui.endedReason.hidden = true;
    try {
      await ensureCamera();
    } catch (error) {
      showNotice(`The camera is not available: ${error.message}`);
      ui.start.disabled = false;
      return;
    }
    status.sessionId = null;
    status.endedCode = null;
    current = new StreamingSession();
    current.open();
    ui.stop.disabled = false;
  });

  ui.stop.addEventListener("click", () => current?.stop());
  window.addEventListener("pagehide", () => current?.stop());

  loadPipelines().then(
    () => { ui.start.disabled = false; },
    (error) => showNotice(`Could not load the pipelines: ${error.message}`),
  );
})();
