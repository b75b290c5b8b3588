// Accessibility and layout check of generated leaderboard pages in headless Chromium.
//
// For every HTML page under the given folders, at widths 1440, 1280, 1024 and 390 px: runs
// axe-core (WCAG 2.x A/AA and best-practice rules), checks that the page itself does not scroll
// sideways, that table header cells stick (position: sticky) and that every scrollable region
// can take keyboard focus; saves a screenshot of the first screen of each page at each width.
// Prints one line per page and width, and exits 1 when any page has a serious or critical
// violation (so it can gate a regeneration of the committed pages).
//
// Not a Python dependency of the harness: it needs Node.js, a Chromium and two npm packages.
//   npm install --prefix /some/dir playwright-core axe-core
//   NODE_PATH=/some/dir/node_modules node tools/check_pages.cjs leaderboards --shots /tmp/shots
// Options: --shots DIR (screenshots; default none), --chromium PATH (default /usr/bin/chromium),
//          --widths 1440,1280 (default 1440,1280,1024,390), --json FILE (every violation).

const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");
const AXE = fs.readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

function parseArgs(argv) {
  const out = { dirs: [], shots: null, chromium: "/usr/bin/chromium", widths: [1440, 1280, 1024, 390], json: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--shots") out.shots = argv[++i];
    else if (a === "--chromium") out.chromium = argv[++i];
    else if (a === "--json") out.json = argv[++i];
    else if (a === "--widths") out.widths = argv[++i].split(",").map(Number);
    else out.dirs.push(a);
  }
  if (!out.dirs.length || out.widths.some((w) => !(w > 0))) {
    console.error("usage: node tools/check_pages.cjs DIR [DIR ...] [--shots DIR] [--widths 1440,390] [--json FILE]");
    process.exit(2);
  }
  return out;
}

function pages(dirs) {
  const found = [];
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".html")) found.push(p);
    }
  };
  for (const d of dirs) fs.statSync(d).isDirectory() ? walk(d) : found.push(d);
  return found.sort();
}

// Layout facts axe does not check: sideways scrolling of the page, sticky headers, focusable scrollers.
function layout() {
  const doc = document.documentElement;
  const heads = [...document.querySelectorAll("thead th")];
  // a header cell sticks when it or its row group is position: sticky
  const sticks = (el) => el && getComputedStyle(el).position === "sticky";
  const sticky = heads.filter((th) => sticks(th) || sticks(th.closest("thead"))).length;
  const scrollers = [...document.querySelectorAll("*")].filter((el) => {
    const s = getComputedStyle(el);
    return el.scrollWidth > el.clientWidth + 1 && ["auto", "scroll"].includes(s.overflowX);
  });
  const unfocusable = scrollers.filter((el) => el.tabIndex < 0 && !el.querySelector("a,button,input,select,[tabindex]"));
  return { pageOverflow: doc.scrollWidth - doc.clientWidth, headers: heads.length, sticky,
           scrollers: scrollers.length, unfocusable: unfocusable.length };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const browser = await chromium.launch({ executablePath: args.chromium, args: ["--no-sandbox"] });
  const all = [];
  let bad = 0;
  if (args.shots) fs.mkdirSync(args.shots, { recursive: true });
  for (const file of pages(args.dirs)) {
    for (const width of args.widths) {
      const page = await browser.newPage({ viewport: { width, height: 900 } });
      await page.goto("file://" + path.resolve(file));
      await page.addScriptTag({ content: AXE });
      const res = await page.evaluate(async () => await axe.run(document, { resultTypes: ["violations"] }));
      const lay = await page.evaluate(layout);
      const counts = { critical: 0, serious: 0, moderate: 0, minor: 0 };
      for (const v of res.violations) {
        counts[v.impact] = (counts[v.impact] || 0) + 1;
        all.push({ page: file, width, id: v.id, impact: v.impact, nodes: v.nodes.length, help: v.help,
                   targets: v.nodes.slice(0, 3).map((n) => n.target.join(" ")) });
      }
      if (counts.critical + counts.serious > 0) bad++;
      const ids = res.violations.map((v) => `${v.id}(${v.impact[0]}:${v.nodes.length})`).join(" ") || "-";
      console.log(`${file} @${width}: critical ${counts.critical} serious ${counts.serious} moderate ${counts.moderate} ` +
                  `minor ${counts.minor} | page overflow ${lay.pageOverflow}px, sticky th ${lay.sticky}/${lay.headers}, ` +
                  `scrollers ${lay.scrollers} (unfocusable ${lay.unfocusable}) | ${ids}`);
      if (args.shots) {
        const name = path.relative(process.cwd(), file).replace(/[\\/]/g, "__").replace(/\.html$/, "");
        await page.screenshot({ path: path.join(args.shots, `${name}@${width}.png`) });
      }
      await page.close();
    }
  }
  await browser.close();
  if (args.json) fs.writeFileSync(args.json, JSON.stringify(all, null, 1));
  console.log(`${bad} page-width(s) with serious or critical violations`);
  process.exit(bad ? 1 : 0);
}

main().catch((e) => { console.error(String(e && e.message || e).split("\n")[0]); process.exit(2); });
