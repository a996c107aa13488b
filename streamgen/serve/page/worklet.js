// AudioWorklet processors for the streamgen page (loaded with audioWorklet.addModule).

// The microphone: posts Float32 blocks of about 20 ms to the page.
class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(Math.round(sampleRate / 50));
    this.fill = 0;
  }
  process(inputs) {
    const x = inputs[0] && inputs[0][0];
    if (x) {
      for (let i = 0; i < x.length; i++) {
        this.block[this.fill++] = x[i];
        if (this.fill === this.block.length) {
          this.port.postMessage(this.block.slice(0));
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

// The speaker: plays Float32 chunks at `rate` Hz in order (linear resampling to the context's rate)
// and reports how many input samples it has played.
class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.step = options.processorOptions.rate / sampleRate;
    this.chunks = [];
    this.pos = 0; // fractional read position in chunks[0]
    this.played = 0;
    this.reported = 0;
    this.port.onmessage = (e) => this.chunks.push(e.data);
  }
  next(offset) {
    let i = Math.floor(this.pos) + offset;
    for (const c of this.chunks) {
      if (i < c.length) return c[i];
      i -= c.length;
    }
    return null;
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    for (let n = 0; n < out.length; n++) {
      const a = this.next(0);
      if (a === null) { out[n] = 0; continue; }
      const b = this.next(1);
      const f = this.pos - Math.floor(this.pos);
      out[n] = b === null ? a : a + f * (b - a);
      const before = Math.floor(this.pos);
      this.pos += this.step;
      const done = Math.floor(this.pos) - before;
      this.played += done;
      while (this.chunks.length && this.pos >= this.chunks[0].length) {
        this.pos -= this.chunks[0].length;
        this.chunks.shift();
      }
    }
    if (this.played - this.reported >= 800 || (this.chunks.length === 0 && this.played !== this.reported)) {
      this.reported = this.played;
      this.port.postMessage({ played: this.played });
    }
    return true;
  }
}

registerProcessor("streamgen-capture", Capture);
registerProcessor("streamgen-player", Player);
