// promql-check reads PromQL expressions, one JSON string per line on stdin, and
// writes one JSON line per expression: {"ok": true} or {"ok": false, "error": "..."}.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"

	"github.com/prometheus/prometheus/promql/parser"
)

type result struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

func main() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	// Prometheus's defaults: no experimental functions or syntax.
	promql := parser.NewParser(parser.Options{})
	for scanner.Scan() {
		var expr string
		if err := json.Unmarshal(scanner.Bytes(), &expr); err != nil {
			fmt.Fprintln(os.Stderr, "promql-check: each line must be a JSON string:", err)
			os.Exit(2)
		}
		answer := result{OK: true}
		if _, err := promql.ParseExpr(expr); err != nil {
			answer = result{OK: false, Error: err.Error()}
		}
		if err := out.Encode(answer); err != nil {
			os.Exit(2)
		}
	}
	if err := scanner.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "promql-check:", err)
		os.Exit(2)
	}
}
