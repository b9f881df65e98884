// Greedy decoding of GGUF files in llama.cpp (the prebuilt CPU binaries of npm's node-llama-cpp),
// from the prompt token ids Amoeba used, so the two engines are compared token for token. One
// process for every job: loading the bindings costs more than a tiny model's decode.
// Usage: node greedy.mjs JOBS.json, JOBS.json = [{"model": PATH, "prompt": [ids], "n": N}, ...]
//   -> a JSON array in job order: {"tokens": [...], "text": "..."} or {"error": "..."}
import {readFileSync} from "node:fs";
import {getLlama} from "node-llama-cpp";

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const results = [];
for (const job of jobs) {
  try {
    const model = await llama.loadModel({modelPath: job.model});
    // One thread: the test runs next to another on 2 cores, and ggml's threads spin at barriers.
    const context = await model.createContext({contextSize: 256, threads: 1});
    const sequence = context.getSequence();
    const out = [];
    for await (const token of sequence.evaluate(job.prompt, {temperature: 0})) {
      if (model.isEogToken(token)) break;
      out.push(token);
      if (out.length >= Number(job.n)) break;
    }
    results.push({tokens: out, text: model.detokenize(out)});
    await context.dispose();
    await model.dispose();
  } catch (e) {
    results.push({error: String(e)});
  }
}
console.log(JSON.stringify(results));
