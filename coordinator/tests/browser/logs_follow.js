// The dashboard's logs panel in a real browser, driven by Playwright in headless Chromium
// (coordinator/tests/dashboard.rs runs it): node logs_follow.js URL JOB_ID ALL RANK1 LATE
// Opens the job (ALL lines shown), picks rank 1 in the filter (RANK1 lines, all rank 1), prints
// "ready" and waits for the LATE lines the test then sends (rank 1's appended in order, the list
// kept scrolled to its end, rank 0's left out), then picks "all" again. Exits 0; any failure
// exits 1 with the reason.
const { chromium } = require('playwright-core');

(async () => {
  const [url, job, all, rank1, late] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.SMELT_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    page.on('pageerror', (e) => { console.error('page error: ' + e.message); process.exitCode = 1; });
    const items = () => page.$$eval('#log-lines li', (lis) => lis.map((li) => ({
      seq: Number(li.dataset.seq), rank: li.dataset.rank, who: li.querySelector('.who').textContent, text: li.querySelector('.txt').textContent,
    })));
    const count = (n) => page.waitForFunction((n) => document.querySelectorAll('#log-lines li').length === Number(n), n, { timeout: 20000 })
      .catch(async () => { throw new Error(`expected ${n} lines, shown: ${JSON.stringify(await items())}`); });

    await page.goto(`${url}#/jobs/${job}`);
    await count(all);
    await page.selectOption('#logs-rank', '1');
    await count(rank1);
    let shown = await items();
    if (!shown.every((l) => l.rank === '1' && l.who === 'a1 r1')) throw new Error(`rank 1 picked, shown: ${JSON.stringify(shown)}`);
    if (!page.url().endsWith(`#/jobs/${job}?rank=1`)) throw new Error(`the filter is not in the address: ${page.url()}`);

    console.log('ready'); // the test sends the late lines now
    await count(Number(rank1) + Number(late));
    shown = await items();
    const seqs = shown.map((l) => l.seq);
    if (!seqs.every((s, i) => i === 0 || s > seqs[i - 1])) throw new Error(`lines out of order or repeated: ${seqs}`);
    if (!shown.every((l) => l.rank === '1')) throw new Error(`another rank's line under the rank 1 filter: ${JSON.stringify(shown)}`);
    if (shown[shown.length - 1].text !== `late line ${late}`) throw new Error(`last line: ${JSON.stringify(shown[shown.length - 1])}`);
    const gap = await page.$eval('#log-lines', (ol) => ol.scrollHeight - ol.scrollTop - ol.clientHeight);
    const overflows = await page.$eval('#log-lines', (ol) => ol.scrollHeight > ol.clientHeight);
    if (!overflows || gap > 8) throw new Error(`the list did not follow the newest line (overflows ${overflows}, ${gap}px below)`);

    await page.selectOption('#logs-rank', '');
    await count(Number(all) + Number(late) + 1); // and rank 0's late line
    if (await page.$('body[data-pwned]')) throw new Error('a log line ran as markup');
    console.log(`followed ${late} late lines of rank 1; ${Number(all) + Number(late) + 1} lines with every rank`);
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e.message || e); process.exit(1); });
