// The streamgen page: pick a task, press Talk, hear the output as it streams, watch the figures.
"use strict";

const $ = (id) => document.getElementById(id);
const stats = {            // read by tests and by anyone curious (window.streamgenStats)
  state: "loading", session: null, sampleRate: null,
  sentSamples: 0, receivedSamples: 0, playedSamples: 0,
  firstAudioMs: null, serverFirstAudioMs: null, lagMs: null, rtf: null,
  sessions: 0, errors: [],
};
window.streamgenStats = stats;

let tasks = {}, ctx = null, micCtx = null, ws = null, mic = null, micSource = null, capture = null, player = null;
let outRate = 16000, firstSentAt = null, level = new Float32Array(0);
// the Talk press being answered: {stopped} once Stop was pressed before the session began; {live} while the
// server's session runs (from "started" to "end"). A new press makes a new one; late answers to an old one are void.
let attempt = null;

function setState(s) {
  stats.state = s;
  $("state").textContent = s;
  const live = s === "talking" || s === "connecting";
  $("talk").textContent = live ? "Stop" : "Talk";
  $("talk").classList.toggle("live", live);
  $("talk").disabled = s === "loading" || s === "finishing";
}

function showError(message) {
  stats.errors.push(message);
  $("error").textContent = message;
}

const fmt = (x, unit, digits = 0) => (x === null || x === undefined ? "–" : `${Number(x).toFixed(digits)} ${unit}`);

function render() {
  $("first-audio").textContent = fmt(stats.firstAudioMs, "ms");
  $("server-first-audio").textContent = fmt(stats.serverFirstAudioMs, "ms");
  $("lag").textContent = fmt(stats.lagMs, "ms");
  $("buffer").textContent = fmt((1000 * (stats.receivedSamples - stats.playedSamples)) / outRate, "ms");
  $("sent").textContent = stats.sampleRate ? fmt(stats.sentSamples / stats.sampleRate, "s", 1) : "–";
  $("received").textContent = fmt(stats.receivedSamples / outRate, "s", 1);
  $("played").textContent = fmt(stats.playedSamples / outRate, "s", 1);
  $("rtf").textContent = stats.rtf === null ? "–" : stats.rtf.toFixed(2);
  drawLevel();
}

function drawLevel() {
  const c = $("wave"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  g.fillStyle = "#2463eb";
  const n = Math.min(level.length, c.width);
  for (let i = 0; i < n; i++) {
    const h = Math.min(1, Math.abs(level[level.length - n + i]) * 4) * c.height;
    g.fillRect(i, (c.height - h) / 2, 1, Math.max(1, h));
  }
}

function pushLevel(x) {
  const step = Math.max(1, Math.floor(x.length / 16)), peaks = [];
  for (let i = 0; i < x.length; i += step) {
    let m = 0;
    for (let j = i; j < Math.min(i + step, x.length); j++) m = Math.max(m, Math.abs(x[j]));
    peaks.push(m);
  }
  const keep = level.length + peaks.length > 640 ? level.slice(level.length + peaks.length - 640) : level;
  level = new Float32Array([...keep, ...peaks]);
}

async function loadTasks() {
  const r = await fetch("/tasks");
  const body = await r.json();
  for (const t of body.tasks) {
    tasks[t.name] = t;
    const o = document.createElement("option");
    o.value = o.textContent = t.name;
    $("task").appendChild(o);
  }
  const wanted = new URLSearchParams(location.search).get("task");
  $("task").value = tasks[wanted] ? wanted : body.default;
  $("token-row").classList.toggle("hidden", !body.auth);
  $("token").value = sessionStorage.getItem("streamgen-token") || "";
  showOptions();
  setState("ready");
}

function showOptions() {
  const t = tasks[$("task").value];
  $("task-description").textContent = t ? t.description : "";
  const box = $("options");
  box.replaceChildren();
  for (const [name, value] of Object.entries(t ? t.options : {})) {
    const label = document.createElement("label");
    label.textContent = name + " ";
    const input = document.createElement("input");
    input.dataset.option = name;
    input.value = String(value);
    label.appendChild(input);
    box.appendChild(label);
  }
}

function options() {
  const out = {};
  for (const input of $("options").querySelectorAll("input")) out[input.dataset.option] = input.value;
  return out;
}

// Two audio contexts: the output plays in one at the model's rate; the microphone is read in one at the browser's own
// rate, its microphone's, and sent at that rate (the server resamples it): Firefox refuses to connect a microphone to
// a context of another rate ("Connecting AudioNodes from AudioContexts with different sample-rate is currently not
// supported").
// one make() in flight at a time: a second Talk while it runs waits for the same one
function single(make) {
  let pending = null;
  return () => pending || (pending = make().finally(() => { pending = null; }));
}

const openAudio = single(() => {
  const play = new AudioContext({ sampleRate: 16000 }), listen = new AudioContext();
  return Promise.all([play.audioWorklet.addModule("/static/worklet.js"), listen.audioWorklet.addModule("/static/worklet.js")])
    .then(() => { ctx = play; micCtx = listen; },
          (err) => { play.close(); listen.close(); throw err; }); // nothing half made stays open
});
const ensureAudio = () => (ctx ? Promise.resolve() : openAudio());

const openConnection = single(() => connect().then((sock) => { ws = sock; return sock; }));
const connection = () => (ws ? Promise.resolve(ws) : openConnection());

function connect() {
  return new Promise((resolve, reject) => {
    const token = $("token").value.trim();
    if (token) sessionStorage.setItem("streamgen-token", token);
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    const sock = new WebSocket(url, token ? ["streamgen", "streamgen.token." + token] : ["streamgen"]);
    sock.binaryType = "arraybuffer";
    sock.onopen = () => resolve(sock);
    sock.onerror = () => reject(new Error("cannot connect to " + url + (token ? "" : " (does the server want a token?)")));
    sock.onclose = (e) => {
      if (sock.retired || ws !== sock) return; // closed here on purpose, or a connection no session used
      ws = null;
      if (stats.state !== "ready" && stats.state !== "ended") {
        stopMic();
        setState("ready");
        showError(e.reason ? "the connection closed: " + e.reason : "the connection closed"); // the server says why
      }
    };
    sock.onmessage = onMessage;
  });
}

function onMessage(e) {
  if (e.data instanceof ArrayBuffer) {
    const pcm = new Int16Array(e.data), x = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) x[i] = pcm[i] / 32768;
    if (stats.firstAudioMs === null && firstSentAt !== null) stats.firstAudioMs = performance.now() - firstSentAt;
    stats.receivedSamples += x.length;
    pushLevel(x);
    player.port.postMessage(x, [x.buffer]);
    return;
  }
  const m = JSON.parse(e.data);
  if (m.type === "started") {
    stats.session = m.session;
    outRate = m.sample_rate;
    if (player) player.disconnect();
    player = new AudioWorkletNode(ctx, "streamgen-player", { numberOfInputs: 0, outputChannelCount: [1], processorOptions: { rate: outRate } });
    player.connect(ctx.destination);
    player.port.onmessage = (ev) => { stats.playedSamples = ev.data.played; };
    const mine = attempt;
    mine.live = true;
    if (mine.stopped) { // Stop was pressed while the start was on its way: end it at once, no microphone
      ws.send(JSON.stringify({ type: "stop" }));
      return;
    }
    startMic(mine).catch((err) => {
      showError("microphone: " + (err.message || err));
      if (mine.live && ws) ws.send(JSON.stringify({ type: "stop" }));
      if (mine.live) setState("finishing");
    });
  } else if (m.type === "stats") {
    if (m.first_audio_ms !== undefined) stats.serverFirstAudioMs = m.first_audio_ms;
    if (m.lag_ms !== undefined) stats.lagMs = m.lag_ms;
    if (m.rtf !== undefined) stats.rtf = m.rtf;
  } else if (m.type === "error") {
    const refused = attempt && !attempt.live; // a start refused: no session, no end follows
    if (refused && m.message.includes("open a new connection") && !attempt.retried) {
      retire(ws); // this connection has opened all it may
      if (attempt.stopped) { setState("ready"); return; } // and Stop was pressed meanwhile: nothing more to do
      attempt.retried = true;
      attempt.sent = false;
      talk(true); // the same start on a new connection
      return;
    }
    showError(m.message);
    if (refused && (stats.state === "connecting" || stats.state === "finishing")) setState("ready");
  } else if (m.type === "end") {
    stopMic();
    if (attempt) attempt.live = false;
    stats.sessions += 1;
    setState("ended");
  }
}

function retire(sock) {
  if (!sock) return;
  sock.retired = true;
  if (ws === sock) ws = null;
  sock.close();
}

async function startMic(mine) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
  });
  if (attempt !== mine || !mine.live || mine.stopped) { // the session ended (refused as busy, idle) or Stop was
    for (const t of stream.getTracks()) t.stop(); // pressed while the permission was asked: nothing to record for
    return;
  }
  mic = stream;
  micSource = micCtx.createMediaStreamSource(mic);
  capture = new AudioWorkletNode(micCtx, "streamgen-capture", { numberOfInputs: 1, numberOfOutputs: 1 });
  const mute = micCtx.createGain();
  mute.gain.value = 0;
  micSource.connect(capture).connect(mute).connect(micCtx.destination);
  capture.port.onmessage = (e) => {
    if (!ws || stats.state !== "talking") return;
    const x = e.data, pcm = new Int16Array(x.length);
    for (let i = 0; i < x.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(x[i] * 32767)));
    if (firstSentAt === null) firstSentAt = performance.now();
    ws.send(pcm.buffer);
    stats.sentSamples += x.length;
  };
  setState("talking");
}

function stopMic() {
  if (capture) { capture.port.onmessage = null; capture.disconnect(); capture = null; }
  if (micSource) { micSource.disconnect(); micSource = null; }
  if (mic) { for (const t of mic.getTracks()) t.stop(); mic = null; }
}

async function talk(again = false) {
  if (!again && (stats.state === "talking" || stats.state === "connecting")) {
    stopMic();
    attempt.stopped = true;
    if (attempt.live && ws) { // the session runs: its input ends, its output still comes
      ws.send(JSON.stringify({ type: "stop" }));
      setState("finishing");
    } else if (attempt.sent) {
      setState("finishing"); // the start is on its way: "started" is answered with a stop
    } else {
      setState("ready"); // nothing sent yet: nothing to stop
    }
    return;
  }
  const mine = again ? attempt : (attempt = { stopped: false, live: false, sent: false, retried: false });
  $("error").textContent = "";
  setState("connecting");
  try {
    await ensureAudio();
    await Promise.all([ctx.resume(), micCtx.resume()]);
    await connection();
    if (attempt !== mine) return; // a newer Talk took over
    if (mine.stopped) { setState("ready"); return; } // Stop was pressed while connecting: nothing was sent
    Object.assign(stats, { sentSamples: 0, receivedSamples: 0, playedSamples: 0, firstAudioMs: null,
                           serverFirstAudioMs: null, lagMs: null, rtf: null, sampleRate: micCtx.sampleRate });
    firstSentAt = null;
    level = new Float32Array(0);
    ws.send(JSON.stringify({ type: "start", task: $("task").value, options: options(), sample_rate: micCtx.sampleRate }));
    mine.sent = true;
  } catch (err) {
    stopMic();
    if (attempt !== mine || mine.stopped) return;
    setState("ready");
    showError(String(err.message || err));
  }
}

$("task").addEventListener("change", showOptions);
$("talk").addEventListener("click", () => talk());
setInterval(render, 200);
loadTasks().catch((err) => showError("cannot load the task list: " + err));
