// Compile contracts/src with solc-js into contracts/artifacts (ABI + bytecode).
//
// Deterministic: pinned solc and OpenZeppelin (package-lock.json), pinned
// evmVersion and optimizer settings, source unit names relative to this
// folder. `node compile.js --check` compiles in memory and exits 1 if the
// committed artifacts differ (CI runs it).
"use strict";
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const HERE = __dirname;
const SOURCES = ["ComputeToken.sol", "Marketplace.sol"];
const OUT = path.join(HERE, "artifacts");
const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 200 },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function findImport(name) {
  const candidates = [path.join(HERE, "node_modules", name), path.join(HERE, name)];
  for (const file of candidates) {
    if (fs.existsSync(file)) return { contents: fs.readFileSync(file, "utf8") };
  }
  return { error: `not found: ${name}` };
}

function compile() {
  const sources = {};
  for (const file of SOURCES) {
    sources[`src/${file}`] = { content: fs.readFileSync(path.join(HERE, "src", file), "utf8") };
  }
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  for (const e of output.errors || []) console.error(e.formattedMessage);
  if (errors.length) process.exit(2);
  const artifacts = {};
  for (const file of SOURCES) {
    const name = path.basename(file, ".sol");
    const contract = output.contracts[`src/${file}`][name];
    artifacts[`${name}.json`] =
      JSON.stringify(
        {
          contractName: name,
          compiler: `solc ${solc.version()}`,
          evmVersion: SETTINGS.evmVersion,
          optimizer: SETTINGS.optimizer,
          abi: contract.abi,
          bytecode: "0x" + contract.evm.bytecode.object,
          deployedBytecode: "0x" + contract.evm.deployedBytecode.object,
        },
        null,
        1,
      ) + "\n";
  }
  return artifacts;
}

const artifacts = compile();
if (process.argv.includes("--check")) {
  const stale = Object.entries(artifacts).filter(([file, text]) => {
    const committed = path.join(OUT, file);
    return !fs.existsSync(committed) || fs.readFileSync(committed, "utf8") !== text;
  });
  if (stale.length) {
    console.error(`contracts/artifacts out of date: ${stale.map(([f]) => f).join(", ")}; run: npm run compile --prefix contracts`);
    process.exit(1);
  }
  console.log("contracts/artifacts match the sources");
} else {
  fs.mkdirSync(OUT, { recursive: true });
  for (const [file, text] of Object.entries(artifacts)) fs.writeFileSync(path.join(OUT, file), text);
  console.log(`wrote ${Object.keys(artifacts).join(", ")} to ${OUT}`);
}
