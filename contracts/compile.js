// Compiles contracts/src/*.sol with the pinned npm solc into contracts/build/<Name>.json (abi + bytecode),
// and the test fixtures in contracts/test/*.sol into contracts/build/test/<Name>.json (kept apart: they are
// never deployed outside the tests). `node contracts/compile.js --check` exits 1 if the committed
// artifacts differ from a fresh compile.
"use strict";
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const buildDir = path.join(__dirname, "build");
// source directory -> where its artifacts go; source units are named "<dir>/<file>.sol"
const outputs = { src: buildDir, test: path.join(buildDir, "test") };
const sources = {};
for (const dir of Object.keys(outputs)) {
  const srcDir = path.join(__dirname, dir);
  for (const file of fs.readdirSync(srcDir).filter((f) => f.endsWith(".sol")).sort()) {
    sources[`${dir}/${file}`] = { content: fs.readFileSync(path.join(srcDir, file), "utf8") };
  }
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    metadata: { bytecodeHash: "none" },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
for (const e of output.errors || []) process.stderr.write(e.formattedMessage + "\n");
if (errors.length) process.exit(1);

const check = process.argv.includes("--check");
let stale = 0;
for (const file of Object.keys(output.contracts)) {
  for (const [name, c] of Object.entries(output.contracts[file])) {
    const artifact = JSON.stringify(
      { contractName: name, compiler: solc.version(), abi: c.abi, bytecode: "0x" + c.evm.bytecode.object },
      null,
      2,
    ) + "\n";
    const target = path.join(outputs[file.split("/")[0]], name + ".json");
    if (check) {
      const current = fs.existsSync(target) ? fs.readFileSync(target, "utf8") : "";
      if (current !== artifact) {
        process.stderr.write(`stale artifact: ${target}\n`);
        stale += 1;
      }
    } else {
      fs.mkdirSync(path.dirname(target), { recursive: true });
      fs.writeFileSync(target, artifact);
      process.stdout.write(`wrote ${path.relative(process.cwd(), target)}\n`);
    }
  }
}
process.exitCode = stale ? 1 : 0;
