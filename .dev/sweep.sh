i=0
while [ $i -lt 96 ]; do
  python3 .dev/sweep.py $i > /dev/null 2>$OUT/err.txt && break
  last=$(grep -o '"idx": [0-9]*' $OUT/sweep.jsonl | tail -1 | grep -o '[0-9]*')
  echo "crash at $last"; i=$((last+1))
done
grep -v '"start"' $OUT/sweep.jsonl | python3 -c "
import sys, json
rows=[json.loads(l) for l in sys.stdin]
ok=[r for r in rows if isinstance(r.get('1x16384'), list)]
ok.sort(key=lambda r: r['1x16384'][0])
for r in ok[:15]: print(r)
print('failed', [ (r['cfg'], r.get('1x16384')) for r in rows if not isinstance(r.get('1x16384'), list)])
"
