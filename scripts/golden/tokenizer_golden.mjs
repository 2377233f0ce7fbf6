#!/usr/bin/env node
// The same golden files as tokenizer_golden.py (read its docstring for the sampling rules), written with the
// `tokenizers` npm package, the Node binding of the same Rust core, for machines that reach npm but not PyPI:
//   (cd /tmp/tok && npm install tokenizers@0.23.2)
//   NODE_PATH=/tmp/tok/node_modules node scripts/golden/tokenizer_golden.mjs \
//       --fixtures ../shared/fixtures --cache .cache/tokenizers --out tests/data/tokenizer
// Any change to the sampling rules must be made in both scripts.
import { createRequire } from 'node:module';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const { Tokenizer } = require('tokenizers');
const tokenizersVersion = require('tokenizers/package.json').version;

const TOKENIZERS = [
  ['aidreams-llama2c-260k-hf', 'fixtures', 'models/aidreams-llama2c-260k-hf/tokenizer.json'],
  ['tinystories-llama2c-280k-hf', 'fixtures', 'models/tinystories-llama2c-280k-hf/tokenizer.json'],
  ['karpathy-stories-llama2c-260k-hf', 'fixtures', 'models/karpathy-stories-llama2c-260k-hf/tokenizer.json'],
  ['qwen3-tiny-trained', 'fixtures', 'models/qwen3-tiny-trained/tokenizer.json'],
  ['qwen3', 'cache', 'qwen3/tokenizer.json'],
  ['llama3', 'cache', 'llama3/tokenizer.json'],
];
const FIRST_LINES = 300;
const CHUNKS = 16;
const CHUNK_LINES = 8;
const MAX_BYTES = 1_900_000;

function args() {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  for (const k of ['fixtures', 'cache', 'out']) if (!out[k]) throw new Error(`missing --${k}`);
  return out;
}

// Python's json.dumps(ensure_ascii=True, separators=(",", ":")), so both scripts write the same bytes.
function dumpAscii(value) {
  return JSON.stringify(value).replace(/[\u0080-\uffff]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

function samplesFor(lines, firstLines) {
  const ranges = [];
  for (let i = 0; i < Math.min(firstLines, lines.length); ++i) ranges.push([i, 1]);
  for (let k = 0; k < CHUNKS; ++k) {
    const start = Math.floor(((k + 1) * lines.length) / (CHUNKS + 2));
    if (start + CHUNK_LINES <= lines.length) ranges.push([start, CHUNK_LINES]);
  }
  return ranges;
}

async function build(name, rootKey, rel, roots, textFiles, edgeCases, firstLines) {
  const file = path.join(roots[rootKey], rel);
  const tok = Tokenizer.fromFile(file);
  const blob = fs.readFileSync(file);
  const out = {
    tokenizer: name,
    tokenizer_file: { root: rootKey, path: rel, bytes: blob.length, sha256: createHash('sha256').update(blob).digest('hex') },
    produced_by: 'scripts/golden/tokenizer_golden.mjs',
    tokenizers_version: tokenizersVersion,
    add_special_tokens: true,
    line_split: 'file bytes decoded as UTF-8, split on \\n; sample [start, count] = \\n.join(lines[start:start+count])',
    line_samples: [],
    edge_cases: [],
  };
  for (const relText of textFiles) {
    const lines = fs.readFileSync(path.join(roots.fixtures, relText), 'utf8').split('\n');
    const ranges = samplesFor(lines, firstLines);
    const ids = [];
    for (const [s, c] of ranges) {
      const enc = await tok.encode(lines.slice(s, s + c).join('\n'), null, { addSpecialTokens: true });
      ids.push(Array.from(enc.getIds()));
    }
    out.line_samples.push({ file: relText, ranges, ids });
  }
  for (const text of edgeCases) {
    const ids = Array.from((await tok.encode(text, null, { addSpecialTokens: true })).getIds());
    out.edge_cases.push({ text, ids, decoded: await tok.decode(ids, true) });
  }
  return out;
}

async function main() {
  const a = args();
  const roots = { fixtures: a.fixtures, cache: a.cache };
  const textFiles = fs.readdirSync(path.join(a.fixtures, 'text')).filter((f) => f.endsWith('.txt')).sort().map((f) => 'text/' + f);
  const here = path.dirname(fileURLToPath(import.meta.url));
  const edgeCases = JSON.parse(fs.readFileSync(path.join(here, 'tokenizer_edge_cases.json'), 'utf8')).texts;
  fs.mkdirSync(a.out, { recursive: true });
  let missing = 0;
  for (const [name, rootKey, rel] of TOKENIZERS) {
    if (!fs.existsSync(path.join(roots[rootKey], rel))) {
      console.error(`tokenizer_golden: ${name}: ${rel} not found under ${roots[rootKey]}, skipped`);
      ++missing;
      continue;
    }
    let firstLines = FIRST_LINES;
    let data, text;
    for (;;) {
      data = await build(name, rootKey, rel, roots, textFiles, edgeCases, firstLines);
      text = dumpAscii(data);
      if (text.length < MAX_BYTES || firstLines <= 10) break;
      firstLines = Math.floor(firstLines / 2);
    }
    const dest = path.join(a.out, name + '.json');
    fs.writeFileSync(dest + '.tmp', text);
    fs.renameSync(dest + '.tmp', dest);
    const n = data.line_samples.reduce((acc, s) => acc + s.ranges.length, 0) + data.edge_cases.length;
    console.log(`tokenizer_golden: ${name}: ${n} texts, first_lines=${firstLines}, ${text.length} bytes -> ${dest}`);
  }
  process.exit(missing === TOKENIZERS.length ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
