// A bpfexec client in Node.js, written from proto/bpfexec/v1/executor.proto alone.
//
// It loads the contract at run time with @grpc/proto-loader (no generated
// code), uploads the seed's eBPF objects, runs them with Execute, and answers
// the helpers `max` (#1) and `mul` (#42) itself over ExecuteStream.
//
//   npm ci && node client.js [--server HOST:PORT] [--objects DIR]
//
// Defaults: $BPFEXEC_SERVER or localhost:50051, and the repository's
// tests/fixtures/obj. Prints one line per execution and exits non-zero when a
// result is not the expected one.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "proto");

function parseArgs(argv) {
  const options = {
    server: process.env.BPFEXEC_SERVER || "localhost:50051",
    objects: path.join(__dirname, "..", "..", "tests", "fixtures", "obj"),
  };
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i].replace(/^--/, "");
    if (!(flag in options) || argv[i + 1] === undefined) {
      throw new Error(`usage: node client.js [--server HOST:PORT] [--objects DIR] (got ${argv[i]})`);
    }
    options[flag] = argv[i + 1];
  }
  return options;
}

function executorStub(server) {
  const definition = protoLoader.loadSync("bpfexec/v1/executor.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto: module_id, helper_call
    longs: String, // uint64 as decimal strings: no precision lost above 2^53
    enums: String,
    defaults: true,
    oneofs: true, // a virtual field names the member of each oneof that is set
  });
  const { bpfexec } = grpc.loadPackageDefinition(definition);
  return new bpfexec.v1.Executor(server, grpc.credentials.createInsecure());
}

const unary = (stub, method, request) =>
  new Promise((resolve, reject) => {
    stub[method](request, { deadline: Date.now() + 10_000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });

// uint64 arithmetic: helpers take and return registers modulo 2^64.
const U64 = (1n << 64n) - 1n;
const HELPERS = {
  max: (a, b) => (a > b ? a : b),
  mul: (a, b) => (a * b) & U64,
};
// The seed programs call max and mul by number (helper_pointers.c) or by name
// (helper_prototypes.c); the client offers both.
const HELPER_NUMBERS = { 1: "max", 42: "mul" };

// Run one execution over ExecuteStream, answering every HelperCall.
function executeWithHelpers(stub, request) {
  return new Promise((resolve, reject) => {
    const stream = stub.ExecuteStream({ deadline: Date.now() + 10_000 });
    let result = null;
    stream.on("data", (message) => {
      if (message.message === "result") {
        result = message.result;
        stream.end();
      } else if (message.message === "helper_call") {
        const call = message.helper_call;
        const name = call.helper === "number" ? HELPER_NUMBERS[call.number] : call.name;
        const [a, b] = call.args.map(BigInt);
        const fn = HELPERS[name];
        const outcome = fn ? { value: fn(a, b).toString() } : { error: `no helper ${name}` };
        stream.write({ helper_result: { call_id: call.call_id, ...outcome } });
      }
      // This client never sends memory_read or memory_write, so no *_result comes.
    });
    stream.on("error", reject);
    stream.on("end", () =>
      result ? resolve(result) : reject(new Error("stream ended without a result")),
    );
    stream.write({
      start: {
        request,
        helper_numbers: Object.keys(HELPER_NUMBERS).map(Number),
        helper_names: Object.keys(HELPERS),
      },
    });
  });
}

// Module ids are content hashes: a replica that does not have the module
// answers NOT_FOUND, and uploading the same bytes again gives the same id.
async function withReupload(stub, code, name, run) {
  const module = await unary(stub, "LoadModule", { code, name });
  try {
    return await run(module.id);
  } catch (error) {
    if (error.code !== grpc.status.NOT_FOUND) throw error;
    const again = await unary(stub, "LoadModule", { code, name });
    return run(again.id);
  }
}

const CASES = [
  // [object, function, args, fuel, remote helpers?, expected return value or trap kind]
  ["example-O2.o", "example", [5, 7], 0, false, "7"],
  ["example-O2.o", "example", [1, 7], 0, false, "5"],
  ["helper_pointers-O2.o", "foo", [7, 3], 0, true, "7"],
  ["helper_pointers-O2.o", "foo", [2, 3], 0, true, "106"],
  ["helper_prototypes-O2.o", "foo", [7, 3], 0, true, "7"],
  ["helper_prototypes-O2.o", "foo", [2, 3], 0, true, "106"],
  ["infinite_loop-O2.o", "infinite_loop", [0], 10_000, false, "OUT_OF_FUEL"],
];

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const stub = executorStub(options.server);
  let failures = 0;
  for (const [object, fn, args, fuel, remote, expected] of CASES) {
    const code = fs.readFileSync(path.join(options.objects, object));
    const result = await withReupload(stub, code, object, (moduleId) => {
      const request = {
        module_id: moduleId,
        function: fn,
        args: args.map((value) => ({ value: String(value) })),
        fuel: String(fuel),
      };
      return remote ? executeWithHelpers(stub, request) : unary(stub, "Execute", request);
    });
    const got = result.trap && result.trap.kind ? result.trap.kind : result.return_value;
    const ok = got === expected;
    failures += ok ? 0 : 1;
    const via = remote ? "ExecuteStream" : "Execute";
    console.log(
      `${ok ? "ok" : "FAIL"} ${object} ${fn}(${args.join(", ")}) = ${got}` +
        ` (${via}, fuel ${result.fuel_used}${ok ? "" : `, expected ${expected}`})`,
    );
  }
  stub.close();
  console.log(`${CASES.length - failures} of ${CASES.length} executions as expected`);
  process.exitCode = failures ? 1 : 0;
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exitCode = 2;
});
