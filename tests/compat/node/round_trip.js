// Write and read OAuth tokens through pgseal with node-postgres, and print
// what the client read as one JSON object on standard output.
//
// Usage: node round_trip.js TOKENS_JSON
// The connection comes from the standard libpq variables (PGHOST, PGPORT,
// PGUSER, PGPASSWORD, PGDATABASE), which node-postgres reads itself.
"use strict";

const { Client, Pool } = require("pg");

const INSERT =
  "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) " +
  "VALUES ($1, $2, $3) RETURNING user_id, access_token";
const SELECT_ONE = "SELECT access_token, refresh_token FROM oauth_tokens WHERE user_id = $1";

async function main() {
  const tokens = JSON.parse(process.argv[2]);
  const client = new Client();
  await client.connect();
  const output = {};
  try {
    // Unnamed statements: Parse, Bind, Execute for every query.
    output.returned = [];
    for (const [userId, token] of tokens.slice(0, 3)) {
      const result = await client.query(INSERT, [userId, token, `refresh-${userId}`]);
      output.returned.push(result.rows[0]);
    }

    // A named statement is parsed once per connection, then only bound.
    output.named = [];
    for (let round = 0; round < 3; round++) {
      for (const [userId] of tokens.slice(0, 3)) {
        const result = await client.query({ name: "select-token", text: SELECT_ONE, values: [userId] });
        output.named.push(result.rows[0]);
      }
    }

    // A pool runs the remaining inserts on several connections at once.
    const pool = new Pool({ max: 3 });
    try {
      await Promise.all(
        tokens.slice(3).map(([userId, token]) => pool.query(INSERT, [userId, token, null]))
      );
    } finally {
      await pool.end();
    }

    // No parameters: node-postgres sends a simple Query message.
    const all = await client.query({
      text: "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id",
      rowMode: "array",
    });
    output.all = all.rows;

    // A statement the proxy rejects arrives as an ordinary error.
    try {
      await client.query("SELECT id FROM oauth_tokens WHERE access_token LIKE $1", ["gho%"]);
      output.rejected = null;
    } catch (error) {
      output.rejected = { code: error.code, message: error.message };
    }
  } finally {
    await client.end();
  }
  process.stdout.write(JSON.stringify(output));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
