#!/usr/bin/env node
// Compile the contracts in this directory with the pinned solcjs and write
// build/<Name>.json artifacts (abi, bytecode, deployedBytecode, compiler,
// sourceHash). Output is deterministic: rebuilding unchanged sources gives
// byte-identical files.
//
//   npm ci --prefix contracts && node contracts/build.js          # rebuild
//   node contracts/build.js --check   # exit 1 if a committed artifact is stale
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const HERE = __dirname;
const BUILD_DIR = path.join(HERE, 'build');
// One entry per artifact: contract name -> source file (relative to HERE).
const CONTRACTS = {
  TestToken: 'TestToken.sol',
  PaymentRouter: 'PaymentRouter.sol',
  TestWallet: 'TestWallet.sol',
  TestPriceFeed: 'TestPriceFeed.sol',
};
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
  outputSelection: {
    '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] },
  },
};

// JSON.stringify with object keys sorted at every level.
function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === 'object') {
    const out = {};
    for (const k of Object.keys(value).sort()) out[k] = sortKeys(value[k]);
    return out;
  }
  return value;
}

function serialize(obj) {
  return JSON.stringify(sortKeys(obj), null, 2) + '\n';
}

function compileAll() {
  const sources = {};
  const raw = {};
  for (const file of new Set(Object.values(CONTRACTS))) {
    raw[file] = fs.readFileSync(path.join(HERE, file));
    sources[file] = { content: raw[file].toString('utf8') };
  }
  const input = { language: 'Solidity', sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));

  const errors = (output.errors || []).filter((e) => e.severity === 'error');
  for (const e of output.errors || []) process.stderr.write(e.formattedMessage || e.message);
  if (errors.length) {
    throw new Error(`solc reported ${errors.length} error(s)`);
  }

  const compiler = `solc-${solc.version()}`;
  const artifacts = {};
  for (const [name, file] of Object.entries(CONTRACTS)) {
    const c = output.contracts && output.contracts[file] && output.contracts[file][name];
    if (!c) throw new Error(`contract ${name} not found in ${file}`);
    artifacts[name] = serialize({
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
      deployedBytecode: '0x' + c.evm.deployedBytecode.object,
      compiler,
      sourceHash: crypto.createHash('sha256').update(raw[file]).digest('hex'),
    });
  }
  return artifacts;
}

function main(argv) {
  const args = argv.slice(2);
  const check = args.includes('--check');
  const unknown = args.filter((a) => a !== '--check');
  if (unknown.length) {
    process.stderr.write(`usage: node build.js [--check]\nunknown argument(s): ${unknown.join(' ')}\n`);
    return 2;
  }

  const artifacts = compileAll();

  if (check) {
    let stale = 0;
    for (const [name, text] of Object.entries(artifacts)) {
      const file = path.join(BUILD_DIR, `${name}.json`);
      const rel = path.relative(process.cwd(), file);
      let current = null;
      try {
        current = fs.readFileSync(file, 'utf8');
      } catch (err) {
        if (err.code !== 'ENOENT') throw err;
      }
      if (current === null) {
        process.stdout.write(`missing: ${rel}\n`);
        stale++;
      } else if (current !== text) {
        process.stdout.write(`differs from a fresh build: ${rel}\n`);
        stale++;
      }
    }
    if (stale) {
      process.stdout.write(`${stale} artifact(s) stale; run: node contracts/build.js\n`);
      return 1;
    }
    process.stdout.write(`${Object.keys(artifacts).length} artifact(s) up to date\n`);
    return 0;
  }

  fs.mkdirSync(BUILD_DIR, { recursive: true });
  for (const [name, text] of Object.entries(artifacts)) {
    const file = path.join(BUILD_DIR, `${name}.json`);
    fs.writeFileSync(file, text);
    process.stdout.write(`wrote ${path.relative(process.cwd(), file)}\n`);
  }
  return 0;
}

try {
  process.exitCode = main(process.argv);
} catch (err) {
  process.stderr.write(`build failed: ${err.message}\n`);
  process.exitCode = 2;
}
