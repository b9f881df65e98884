// Greedy decoding of a GGUF file in llama.cpp (the prebuilt CPU binaries of npm's node-llama-cpp),
// from the prompt token ids Amoeba used, so the two engines are compared token for token.
// Usage: node greedy.mjs MODEL.gguf '[prompt ids]' N  ->  {"tokens": [...], "text": "..."}
import {getLlama} from "node-llama-cpp";

const [modelPath, promptJson, n] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 256, threads: 2});
const sequence = context.getSequence();
const out = [];
for await (const token of sequence.evaluate(JSON.parse(promptJson), {temperature: 0})) {
  if (model.isEogToken(token)) break;
  out.push(token);
  if (out.length >= Number(n)) break;
}
console.log(JSON.stringify({tokens: out, text: model.detokenize(out)}));
await context.dispose();
await model.dispose();
